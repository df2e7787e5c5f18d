//! `weft policy explain`: would this connection pass the cluster's
//! NetworkPolicies, and which policy and rule decided?
//!
//! The answer is weft-model's reference evaluator ([`netpol::evaluate`]),
//! the same semantics the CNI's eBPF datapath is held to. The cluster state
//! comes from the controller's own sources, so `explain` sees what the
//! agent sees: `--manifests DIR` is the directory source
//! ([`source::dir::DirSource`]: same walk, same parsing, same
//! `path:line: message` errors, except that a bad file fails the command
//! instead of keeping a last good version it never had), and without it the
//! kube source ([`source::kube::run_kinds`] for Pods, Namespaces and
//! NetworkPolicies) lists the cluster once from KUBECONFIG or the in-cluster
//! service account. Both fill an [`Index`]; the world is read from it.
//!
//! The mesh layer is answered from the same state: the controller's
//! compilation of the destination pod's port ([`inbound_server`]) decided by
//! the proxy's own functions (`weft_proxy::authz::policy::compile` and
//! `decide`), for the client's identity
//! (`spiffe://<td>/ns/<ns>/sa/<serviceAccount>` when the client pod carries
//! the proxy, else unauthenticated) and IP, and the request when the server
//! is routed. [`warnings`] says where the layers disagree in a way that
//! breaks traffic.
//!
//! Exit status: 0 when both layers allow (a mesh audit counts as allowed),
//! 1 denied, 2 error (a bad argument, manifest or cluster connection), so
//! scripts can `weft policy explain ... && ...`.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_controller::index::inbound::{inbound_server, InboundConfig};
use weft_controller::index::{Index, State};
use weft_controller::metrics::{KindLabels, Metrics};
use weft_controller::source::dir::{DirError, DirSource, ManifestError};
use weft_controller::source::{self, Readiness};
use weft_model::authz::DefaultPolicy as InboundDefault;
use weft_model::netpol::{
    self, Connection, Direction, DirectionVerdict, EvalError, Peer, Protocol, Resolved, Verdict,
    World,
};
use weft_model::{Kind, ObjectKey, Pod};
use weft_proxy::authz::decide::{self, Client, Decision};
use weft_proxy::authz::policy::{compile, Authn, Protocol as ServerProtocol};

/// `weft policy ...`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Explain whether NetworkPolicies and the mesh's authorization allow a connection, and
    /// which objects decided.
    ///
    /// Evaluates Kubernetes NetworkPolicy semantics (the reference the
    /// Weft CNI's datapath is tested against) for a new connection from
    /// --from to --to on --port, and the destination proxy's decision
    /// (Server, AuthorizationPolicies, inbound routes, default policy) for
    /// the client's identity and, with --method/--path, the request; warns
    /// where the two disagree in a way that breaks traffic. Reads the cluster
    /// (KUBECONFIG or the in-cluster service account; list/watch on pods,
    /// namespaces, networkpolicies, servers, authorizationpolicies, httproutes
    /// and grpcroutes) or, with --manifests, a directory of YAML/JSON
    /// manifests. Exit status: 0 both layers allow, 1 denied, 2 error.
    Explain(ExplainArgs),
    /// Print the least-privilege AuthorizationPolicies and NetworkPolicies for the traffic
    /// a namespace's proxies (audit mode) and the CNI agents saw, as YAML for kubectl apply.
    ///
    /// Scrapes weft_inbound_authz_total from the proxies (--from-proxies, or the
    /// namespace's meshed pods found with --source) and reads flows from CNI agents
    /// (--agents, live for --duration) or files (--flows). Exit status: 0, or 2 on an error.
    Audit(crate::audit::AuditArgs),
}

/// `weft policy explain`.
#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    /// The source: `namespace/pod` or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub from: PeerArg,
    /// The destination: `namespace/pod` or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub to: PeerArg,
    /// Destination port: `80`, `80/TCP`, `53/UDP`, `9000/SCTP`, or a named
    /// container port of the destination pod (`http/TCP`); TCP when no
    /// protocol is given.
    #[arg(long, value_name = "PORT[/PROTO]")]
    pub port: PortArg,
    /// For the mesh verdict: the HTTP request path (with its query, if routes match on it).
    /// Without --path and --method, a server with routes is asked about `GET /`.
    #[arg(long, value_name = "PATH", value_parser = parse_request_path)]
    pub path: Option<String>,
    /// For the mesh verdict: the HTTP request method (GET when only --path is given).
    #[arg(long, value_name = "METHOD")]
    pub method: Option<http::Method>,
    /// The mesh's trust domain (the controller's --trust-domain), for client identities
    /// spiffe://<trust-domain>/ns/<ns>/sa/<serviceAccount>.
    #[arg(long, value_name = "DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// The controller's --default-inbound-policy, for ports no Server selects.
    #[arg(long, value_name = "POLICY", default_value_t = InboundDefault::default())]
    pub default_inbound_policy: InboundDefault,
    /// The controller's --cluster-networks (comma-separated CIDRs), for cluster-* policies.
    #[arg(long, value_name = "CIDRS", default_value = weft_model::authz::DEFAULT_CLUSTER_NETWORKS, value_parser = parse_cluster_networks)]
    pub cluster_networks: ClusterNetworks,
    /// Read Pods, Namespaces and NetworkPolicies from every *.yaml, *.yml
    /// and *.json file under DIR instead of the cluster.
    #[arg(long, value_name = "DIR")]
    pub manifests: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Seconds to wait for the API server to list pods, namespaces and NetworkPolicies.
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

/// `--cluster-networks`: one flag value, a comma-separated list (a newtype: clap would read a
/// `Vec` as a repeated flag).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNetworks(pub Vec<netpol::Cidr>);

/// `--path`: an origin-form request target (`/books?id=1`).
fn parse_request_path(s: &str) -> Result<String, String> {
    match s.parse::<http::uri::PathAndQuery>() {
        Ok(p) if s.starts_with('/') => Ok(p.to_string()),
        _ => Err(format!(
            "{s:?} is not a request path: expected /path, optionally with ?query"
        )),
    }
}

fn parse_cluster_networks(s: &str) -> Result<ClusterNetworks, String> {
    weft_model::authz::parse_networks(s).map(ClusterNetworks)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// `--from` / `--to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerArg {
    Pod(ObjectKey),
    Ip(IpAddr),
}

impl FromStr for PeerArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(PeerArg::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PeerArg::Pod(ObjectKey::new(ns, name)))
            }
            _ => Err(format!(
                "{s:?} is neither namespace/pod nor an IP address (e.g. default/web or 10.1.0.5)"
            )),
        }
    }
}

impl From<&PeerArg> for Peer {
    fn from(p: &PeerArg) -> Peer {
        match p {
            PeerArg::Pod(k) => Peer::Pod(k.clone()),
            PeerArg::Ip(ip) => Peer::Ip(*ip),
        }
    }
}

/// `--port`: a number or a container port name, and a protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortArg {
    Number(u16, Protocol),
    Named(String, Protocol),
}

impl FromStr for PortArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("{s:?} is not a port: {why} (expected N, N/TCP, N/UDP, N/SCTP or a port name such as http/TCP)")
        };
        let (port, protocol) = match s.split_once('/') {
            Some((port, proto)) => {
                let protocol = Protocol::parse_k8s(&proto.to_ascii_uppercase())
                    .ok_or_else(|| bad(&format!("unknown protocol {proto:?}")))?;
                (port, protocol)
            }
            None => (s, Protocol::Tcp),
        };
        if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) {
            return match port.parse::<u16>() {
                Ok(n) if n > 0 => Ok(PortArg::Number(n, protocol)),
                _ => Err(bad("the number must be 1 to 65535")),
            };
        }
        // A Kubernetes port name (IANA_SVC_NAME): at most 15 lowercase
        // letters, digits and hyphens, with at least one letter.
        let valid_name = (1..=15).contains(&port.len())
            && port
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && port.bytes().any(|b| b.is_ascii_lowercase())
            && !port.starts_with('-')
            && !port.ends_with('-');
        if valid_name {
            Ok(PortArg::Named(port.to_string(), protocol))
        } else {
            Err(bad("neither a number nor a container port name"))
        }
    }
}

/// Why `explain` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// Every manifest file that failed to load, one `path:line: message` per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Manifests(Vec<ManifestError>),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error(
        "no Kubernetes configuration ({0}): set KUBECONFIG, run in a pod, or pass --manifests DIR"
    )]
    KubeConfig(String),
    #[error("cannot list namespaces from the Kubernetes API server at {url}: {message}; check KUBECONFIG and that the cluster is reachable, or pass --manifests DIR")]
    Unreachable { url: String, message: String },
    #[error("the Kubernetes API server at {url} did not list {what} within {secs} s ({errors} watch errors); weft needs list/watch on them (RBAC)")]
    SyncTimeout {
        url: String,
        /// What was being listed, e.g. "pods and services".
        what: &'static str,
        secs: u64,
        errors: u64,
    },
    #[error("no pod {key} in the cluster state{}", did_you_mean(.close))]
    UnknownPod {
        key: ObjectKey,
        close: Vec<ObjectKey>,
    },
    #[error("named port {name}/{protocol} needs a pod as the destination, and {to} is not one; give a port number")]
    NamedPortNotPod {
        name: String,
        protocol: Protocol,
        to: String,
    },
    #[error("pod {pod} has no container port named {name} with protocol {protocol}{}", known_ports(.known))]
    NoSuchPort {
        pod: ObjectKey,
        name: String,
        protocol: Protocol,
        known: Vec<String>,
    },
    #[error(transparent)]
    Eval(#[from] EvalError),
}

fn did_you_mean(close: &[ObjectKey]) -> String {
    if close.is_empty() {
        " (is it running, and in the namespace you meant?)".into()
    } else {
        let names: Vec<String> = close.iter().map(ToString::to_string).collect();
        format!("; did you mean {}?", names.join(", "))
    }
}

fn known_ports(known: &[String]) -> String {
    if known.is_empty() {
        " (it declares no named ports)".into()
    } else {
        format!(" (its named ports: {})", known.join(", "))
    }
}

/// A verdict and how the port was given.
#[derive(Clone, Debug)]
pub struct Explanation {
    pub verdict: Verdict,
    /// The name `--port` gave, resolved to `verdict.port`.
    pub named_port: Option<String>,
    /// The policies that isolate the source (egress) and the destination
    /// (ingress), by key; empty for an end that is not a pod.
    pub egress_isolated_by: Vec<ObjectKey>,
    pub ingress_isolated_by: Vec<ObjectKey>,
    /// The destination proxy's verdict ([`with_mesh`]; not applicable until then).
    pub mesh: Mesh,
    pub warnings: Vec<Warning>,
}

impl Explanation {
    /// Both layers let the traffic through.
    pub fn allowed(&self) -> bool {
        self.verdict.allowed && self.mesh.allows()
    }
}

/// Adds the mesh verdict and the warnings to a NetworkPolicy explanation. Pure.
pub fn with_mesh(
    mut e: Explanation,
    state: &State,
    world: &World,
    config: &MeshConfig,
    request: Option<&RequestArg>,
) -> Explanation {
    e.mesh = mesh_verdict(state, world, &e.verdict, config, request);
    e.warnings = warnings(world, &e.verdict, &e.mesh);
    e
}

/// Decides the connection `from` → `to` on `port` in `world`. Pure.
pub fn explain(
    world: &World,
    from: &PeerArg,
    to: &PeerArg,
    port: &PortArg,
) -> Result<Explanation, ExplainError> {
    for peer in [from, to] {
        if let PeerArg::Pod(key) = peer {
            if world.pod(key).is_none() {
                return Err(ExplainError::UnknownPod {
                    key: key.clone(),
                    close: close_matches(world, key),
                });
            }
        }
    }
    let (number, protocol, named_port) = match port {
        PortArg::Number(n, p) => (*n, *p, None),
        PortArg::Named(name, protocol) => {
            let pod = match to {
                PeerArg::Pod(key) => world.pod(key),
                PeerArg::Ip(ip) => world.pod_by_ip(*ip),
            };
            let pod = pod.ok_or_else(|| ExplainError::NamedPortNotPod {
                name: name.clone(),
                protocol: *protocol,
                to: peer_text(to),
            })?;
            let proto = protocol.to_string();
            let found = pod.container_ports.iter().find(|c| {
                c.name.as_deref() == Some(name.as_str()) && c.protocol.eq_ignore_ascii_case(&proto)
            });
            match found {
                Some(c) => (c.port, *protocol, Some(name.clone())),
                None => {
                    return Err(ExplainError::NoSuchPort {
                        pod: pod.key.clone(),
                        name: name.clone(),
                        protocol: *protocol,
                        known: pod
                            .container_ports
                            .iter()
                            .filter_map(|c| {
                                let n = c.name.as_ref()?;
                                Some(format!(
                                    "{n}={}/{}",
                                    c.port,
                                    c.protocol.to_ascii_uppercase()
                                ))
                            })
                            .collect(),
                    })
                }
            }
        }
    };
    let conn = Connection {
        src: from.into(),
        dst: to.into(),
        port: number,
        protocol,
    };
    let verdict = netpol::evaluate(world, &conn)?;
    let isolated_by = |end: &Resolved, direction| -> Vec<ObjectKey> {
        end.pod
            .as_ref()
            .and_then(|k| world.pod(k))
            .map(|p| {
                world
                    .isolating(p, direction)
                    .map(|np| np.key.clone())
                    .collect()
            })
            .unwrap_or_default()
    };
    Ok(Explanation {
        egress_isolated_by: isolated_by(&verdict.src, Direction::Egress),
        ingress_isolated_by: isolated_by(&verdict.dst, Direction::Ingress),
        verdict,
        named_port,
        mesh: Mesh::NotApplicable {
            reason: "not asked".into(),
        },
        warnings: Vec::new(),
    })
}

fn peer_text(p: &PeerArg) -> String {
    match p {
        PeerArg::Pod(k) => k.to_string(),
        PeerArg::Ip(ip) => ip.to_string(),
    }
}

/// Pods whose key is close to `key`: the same name in another namespace, or
/// a name within a small edit distance (or a prefix) in the same namespace.
fn close_matches(world: &World, key: &ObjectKey) -> Vec<ObjectKey> {
    let mut close: Vec<(usize, ObjectKey)> = world
        .pods()
        .filter_map(|p: &Pod| {
            let k = &p.key;
            let name_distance = edit_distance(&k.name, &key.name);
            let near = name_distance <= (key.name.len() / 3).max(1)
                || k.name.starts_with(&key.name)
                || key.name.starts_with(&k.name);
            if k.namespace == key.namespace && near {
                Some((name_distance, k.clone()))
            } else if k.name == key.name {
                Some((edit_distance(&k.namespace, &key.namespace), k.clone()))
            } else {
                None
            }
        })
        .collect();
    close.sort();
    close.into_iter().take(5).map(|(_, k)| k).collect()
}

/// Edits (insert, delete, substitute, swap two neighbours) from `a` to `b`:
/// the optimal string alignment distance, so a typo like `wbe` is one edit
/// from `web`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

fn end_text(r: &Resolved) -> String {
    r.to_string()
}

fn port_text(e: &Explanation) -> String {
    let v = &e.verdict;
    let base = format!("port {}/{}", v.port, v.protocol);
    match (&e.named_port, &v.dst.pod) {
        (Some(name), Some(pod)) => format!("{base} (port {name} of {pod})"),
        _ => base,
    }
}

/// The text report: a verdict line, then one line per direction.
pub fn render_text(e: &Explanation) -> String {
    let v = &e.verdict;
    let mut out = format!(
        "{}: {} -> {}, {}\n",
        if e.allowed() { "allowed" } else { "denied" },
        end_text(&v.src),
        end_text(&v.dst),
        port_text(e)
    );
    if v.loopback {
        out.push_str(
            "  the pod connects to itself, which no NetworkPolicy can block (the traffic never leaves its network namespace)\n",
        );
    }
    let direction = |out: &mut String,
                     name: &str,
                     end: &Resolved,
                     peer: &Resolved,
                     d: &DirectionVerdict,
                     isolated_by: &[ObjectKey]| {
        let Some(pod) = &end.pod else {
            out.push_str(&format!(
                "  {name}: allowed: {end} is not a pod in the cluster, so no {name} policy applies\n"
            ));
            return;
        };
        let field = if name == "egress" {
            "spec.egress"
        } else {
            "spec.ingress"
        };
        match d {
            DirectionVerdict::NotIsolated => out.push_str(&format!(
                "  {name}: allowed: no NetworkPolicy isolates {pod} for {name}\n"
            )),
            DirectionVerdict::Allowed {
                policy,
                rule,
                proxy_for,
            } => {
                out.push_str(&format!(
                    "  {name}: allowed by {policy} {field}[{rule}] ({pod} is isolated by {})\n",
                    keys(isolated_by)
                ));
                if let Some(app) = proxy_for {
                    out.push_str(&format!(
                        "    note: {}/TCP is the Weft proxy's inbound port on meshed pod {pod}; it is allowed wherever a rule allows one of the pod's app ports (here {app})\n",
                        v.port
                    ));
                }
            }
            DirectionVerdict::Denied { isolated_by } => out.push_str(&format!(
                "  {name}: denied: {pod} is isolated by {} and no {name} rule of {} allows {peer} on {}\n",
                keys(isolated_by),
                if isolated_by.len() == 1 { "it" } else { "them" },
                port_text(e)
            )),
        }
    };
    direction(
        &mut out,
        "egress",
        &v.src,
        &v.dst,
        &v.egress,
        &e.egress_isolated_by,
    );
    direction(
        &mut out,
        "ingress",
        &v.dst,
        &v.src,
        &v.ingress,
        &e.ingress_isolated_by,
    );
    mesh_text(&mut out, &e.mesh, &v.src);
    for w in &e.warnings {
        out.push_str(&format!("  warning: {}\n", w.message));
    }
    out
}

fn mesh_text(out: &mut String, mesh: &Mesh, src: &Resolved) {
    let d = match mesh {
        Mesh::NotApplicable { reason } => {
            out.push_str(&format!("  mesh: not applicable: {reason}\n"));
            return;
        }
        Mesh::Decided(d) => d,
    };
    let mut at = d.server.clone();
    if let Some(route) = &d.route {
        at.push_str(&format!(", route {route}"));
    }
    if let Some(r) = &d.request {
        at.push_str(&format!(
            ", request {} {}{}",
            r.method,
            r.path,
            if r.assumed {
                " (assumed: give --method and --path)"
            } else {
                ""
            }
        ));
    }
    let head = match d.result {
        "allow" => format!(
            "allowed by {}",
            d.authorization.as_deref().unwrap_or("(unnamed)")
        ),
        "audit_deny" => "audit: no authorization allows it; allowed and counted as audit_deny (the server is in audit mode)".into(),
        "no_route" => "denied: 404 no-route".into(),
        _ => "denied: no authorization allows it".into(),
    };
    out.push_str(&format!("  mesh: {head} (server {at})\n"));
    let client = match (&d.identity, &src.pod) {
        (Some(id), Some(pod)) => format!("identity {id} (meshed pod {pod}), from {}", d.client_ip),
        (Some(id), None) => format!("identity {id}, from {}", d.client_ip),
        (None, Some(pod)) if d.client_meshed => {
            format!(
                "unauthenticated {} (meshed pod {pod}, no mTLS on this port)",
                d.client_ip
            )
        }
        (None, Some(pod)) => format!("unauthenticated {} ({pod} has no Weft proxy)", d.client_ip),
        (None, None) => format!("unauthenticated {} (not a pod)", d.client_ip),
    };
    out.push_str(&format!("    client: {client}\n"));
    if let Some(detail) = &d.detail {
        out.push_str(&format!("    proxy: {detail}\n"));
    }
    for n in &d.notes {
        out.push_str(&format!("    note: {n}\n"));
    }
}

fn keys(keys: &[ObjectKey]) -> String {
    keys.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The JSON report. Its shape is stable: every key is always present
/// (`null` or `[]` when it does not apply).
///
/// ```json
/// {"verdict": "allowed" | "denied", "allowed": bool (both layers),
///  "network_policy_allowed": bool,
///  "mesh": {"decision": "allow" | "deny" | "audit_deny" | "no_route" | "not_applicable",
///           "reason": "why not applicable" | null, "server": "server/ns/name" | "default:<policy>",
///           "route": "httproute/ns/name/rule" | null, "authorization": "..." | null,
///           "identity": "spiffe://..." | null, "client_ip": "..." , "client_meshed": bool,
///           "request": {"method": "GET", "path": "/", "assumed": bool} | null,
///           "audit": bool, "detail": "the proxy's denial message" | null, "notes": [...]},
///  "warnings": [{"kind": "network-policy-denies" | "client-not-meshed"
///                        | "proxy-cannot-reach-controller", "message": "..."}],
///  "loopback": bool,
///  "from": {"pod": "ns/name" | null, "ip": "..." | null}, "to": {...},
///  "port": 80, "protocol": "TCP", "named_port": "http" | null,
///  "egress":  {"decision": "allowed" | "denied" | "not_isolated" | "not_a_pod",
///              "policy": "ns/name" | null, "rule": 0 | null,
///              "isolated_by": ["ns/name", ...], "proxy_inbound_port_for": 8080 | null},
///  "ingress": {...same...},
///  "summary": "one line"}
/// ```
pub fn render_json(e: &Explanation) -> Value {
    let v = &e.verdict;
    let end = |r: &Resolved| {
        json!({
            "pod": r.pod.as_ref().map(ToString::to_string),
            "ip": r.ip.map(|ip| ip.to_string()),
        })
    };
    let direction = |end: &Resolved, d: &DirectionVerdict, isolated: &[ObjectKey]| {
        let isolated: Vec<String> = isolated.iter().map(ToString::to_string).collect();
        match d {
            DirectionVerdict::NotIsolated => json!({
                "decision": if end.pod.is_some() { "not_isolated" } else { "not_a_pod" },
                "policy": null, "rule": null, "isolated_by": isolated, "proxy_inbound_port_for": null,
            }),
            DirectionVerdict::Allowed {
                policy,
                rule,
                proxy_for,
            } => json!({
                "decision": "allowed", "policy": policy.to_string(), "rule": rule,
                "isolated_by": isolated, "proxy_inbound_port_for": proxy_for,
            }),
            DirectionVerdict::Denied { isolated_by } => json!({
                "decision": "denied", "policy": null, "rule": null,
                "isolated_by": isolated_by.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "proxy_inbound_port_for": null,
            }),
        }
    };
    let mesh = match &e.mesh {
        Mesh::NotApplicable { reason } => json!({
            "decision": "not_applicable", "reason": reason, "server": null, "route": null,
            "authorization": null, "identity": null, "client_ip": null, "client_meshed": null,
            "request": null, "audit": false, "detail": null, "notes": [],
        }),
        Mesh::Decided(d) => json!({
            "decision": d.result, "reason": null, "server": d.server, "route": d.route,
            "authorization": d.authorization, "identity": d.identity,
            "client_ip": d.client_ip.to_string(), "client_meshed": d.client_meshed,
            "request": d.request.as_ref().map(|r| json!({
                "method": r.method.as_str(), "path": r.path, "assumed": r.assumed,
            })),
            "audit": d.audit, "detail": d.detail, "notes": d.notes,
        }),
    };
    let warnings: Vec<Value> = e
        .warnings
        .iter()
        .map(|w| json!({"kind": w.kind, "message": w.message}))
        .collect();
    json!({
        "verdict": if e.allowed() { "allowed" } else { "denied" },
        "allowed": e.allowed(),
        "network_policy_allowed": v.allowed,
        "mesh": mesh,
        "warnings": warnings,
        "loopback": v.loopback,
        "from": end(&v.src),
        "to": end(&v.dst),
        "port": v.port,
        "protocol": v.protocol.to_string(),
        "named_port": e.named_port,
        "egress": direction(&v.src, &v.egress, &e.egress_isolated_by),
        "ingress": direction(&v.dst, &v.ingress, &e.ingress_isolated_by),
        "summary": v.to_string(),
    })
}

/// The world in `index`: its namespaces, pods and NetworkPolicies.
pub fn world_from_index(index: &Index) -> World {
    let state = index.read();
    World::new(
        state.namespaces.values().map(|n| (**n).clone()),
        state.pods.values().map(|p| (**p).clone()),
        state.network_policies.values().map(|p| (**p).clone()),
    )
}

/// Loads `dir` with the directory source; any file that fails to load
/// fails the whole load (there is no last good version to fall back on).
pub fn load_manifests(dir: &Path) -> Result<Index, ExplainError> {
    let mut source = DirSource::new(dir, Metrics::new())?;
    source.scan()?;
    let mut errors = source.errors();
    if !errors.is_empty() {
        errors.sort_by(|a, b| (&a.path, a.line).cmp(&(&b.path, b.line)));
        return Err(ExplainError::Manifests(errors));
    }
    let index = Index::new();
    index.reset_kinds(&Kind::ALL, source.objects());
    Ok(index)
}

/// What the kube source read, and how many NetworkPolicies it had to leave
/// out because they do not convert.
#[derive(Debug)]
pub struct Listed {
    pub index: Index,
    pub invalid_network_policies: u64,
}

/// Lists Pods, Namespaces, NetworkPolicies, and for the mesh verdict Servers,
/// AuthorizationPolicies, HTTPRoutes and GRPCRoutes, once with the kube source
/// (`kube::Client::try_default`'s configuration: KUBECONFIG, else
/// in-cluster).
pub async fn list_cluster(timeout: Duration) -> Result<Listed, ExplainError> {
    list_kinds(
        timeout,
        &[
            Kind::Pod,
            Kind::Namespace,
            Kind::NetworkPolicy,
            Kind::Server,
            Kind::AuthorizationPolicy,
            Kind::HttpRoute,
            Kind::GrpcRoute,
        ],
        "pods, namespaces, NetworkPolicies, Servers, AuthorizationPolicies and routes",
    )
    .await
}

/// Lists `kinds` once with the kube source (see [`list_cluster`]); `what`
/// names them in the error when the listing does not finish in time.
pub async fn list_kinds(
    timeout: Duration,
    kinds: &'static [Kind],
    what: &'static str,
) -> Result<Listed, ExplainError> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, ListParams};

    let config = kube::Config::infer()
        .await
        .map_err(|e| ExplainError::KubeConfig(e.to_string()))?;
    let url = config.cluster_url.to_string();
    let client =
        kube::Client::try_from(config).map_err(|e| ExplainError::KubeConfig(e.to_string()))?;
    // One cheap request first: an unreachable server or a refused
    // credential is an error now, not a watcher retrying until the timeout.
    let namespaces = Api::<Namespace>::all(client.clone());
    let params = ListParams::default().limit(1);
    match tokio::time::timeout(timeout, namespaces.list(&params)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(ExplainError::Unreachable {
                url,
                message: e.to_string(),
            })
        }
        Err(_) => {
            return Err(ExplainError::Unreachable {
                url,
                message: format!("no answer within {} s", timeout.as_secs()),
            })
        }
    }
    let index = Index::new();
    let metrics = Metrics::new();
    let readiness = Readiness::default();
    let task = tokio::spawn(source::kube::run_kinds(
        client,
        index.clone(),
        metrics.clone(),
        readiness.clone(),
        kinds,
    ));
    let deadline = Instant::now() + timeout;
    while !readiness.is_ready() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let count = |family: &weft_controller::metrics::Metrics, kind: Kind| {
        family
            .invalid_objects
            .get_or_create(&KindLabels::from(kind))
            .get()
    };
    if !readiness.is_ready() {
        let errors = kinds
            .iter()
            .copied()
            .map(|k| {
                metrics
                    .kube_watch_errors
                    .get_or_create(&KindLabels::from(k))
                    .get()
            })
            .sum();
        return Err(ExplainError::SyncTimeout {
            url,
            what,
            secs: timeout.as_secs(),
            errors,
        });
    }
    Ok(Listed {
        invalid_network_policies: count(&metrics, Kind::NetworkPolicy),
        index,
    })
}

/// Runs `weft policy ...`, printing to stdout and stderr; returns the exit
/// status (0 allowed, 1 denied, 2 error).
pub fn run(args: &PolicyArgs) -> ExitCode {
    let args = match &args.command {
        PolicyCommand::Explain(args) => args,
        PolicyCommand::Audit(args) => return crate::audit::run(args),
    };
    match run_explain(args) {
        Ok(allowed) => ExitCode::from(if allowed { 0 } else { 1 }),
        Err(e) => {
            eprintln!(
                "weft policy explain: {}",
                weft_proto::report::chain(e.chain())
            );
            ExitCode::from(2)
        }
    }
}

fn run_explain(args: &ExplainArgs) -> anyhow::Result<bool> {
    let index = match &args.manifests {
        Some(dir) => load_manifests(dir)?,
        None => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let listed = runtime.block_on(list_cluster(Duration::from_secs(args.timeout)))?;
            if listed.invalid_network_policies > 0 {
                eprintln!(
                    "weft policy explain: warning: {} NetworkPolicies could not be read and are left out; the answer may be wrong",
                    listed.invalid_network_policies
                );
            }
            listed.index
        }
    };
    let world = world_from_index(&index);
    let explanation = explain(&world, &args.from, &args.to, &args.port)?;
    let config = MeshConfig {
        inbound: InboundConfig {
            default_policy: args.default_inbound_policy,
            cluster_networks: args.cluster_networks.0.clone(),
            trust_domain: args.trust_domain.clone(),
        },
    };
    let request = (args.path.is_some() || args.method.is_some()).then(|| RequestArg {
        method: args.method.clone().unwrap_or(http::Method::GET),
        path: args.path.clone().unwrap_or_else(|| "/".into()),
        assumed: false,
    });
    let explanation = with_mesh(
        explanation,
        &index.read(),
        &world,
        &config,
        request.as_ref(),
    );
    let mut stdout = std::io::stdout().lock();
    match args.output {
        Output::Text => stdout.write_all(render_text(&explanation).as_bytes())?,
        Output::Json => {
            serde_json::to_writer_pretty(&mut stdout, &render_json(&explanation))?;
            stdout.write_all(b"\n")?;
        }
    }
    stdout.flush()?;
    Ok(explanation.allowed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peers() {
        assert_eq!(
            "shop/web".parse(),
            Ok(PeerArg::Pod(ObjectKey::new("shop", "web")))
        );
        assert_eq!(
            "10.1.0.5".parse(),
            Ok(PeerArg::Ip(
                "10.1.0.5".parse().unwrap_or_else(|_| unreachable!())
            ))
        );
        assert!(matches!("fd00::1".parse(), Ok(PeerArg::Ip(_))));
        for bad in ["web", "/web", "shop/", "a/b/c", ""] {
            let e = bad.parse::<PeerArg>().expect_err(bad);
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn parses_ports() {
        use Protocol::*;
        let ok = [
            ("80", PortArg::Number(80, Tcp)),
            ("80/TCP", PortArg::Number(80, Tcp)),
            ("53/udp", PortArg::Number(53, Udp)),
            ("9000/SCTP", PortArg::Number(9000, Sctp)),
            ("65535", PortArg::Number(65535, Tcp)),
            ("http", PortArg::Named("http".into(), Tcp)),
            ("dns-udp/UDP", PortArg::Named("dns-udp".into(), Udp)),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<PortArg>().as_ref(), Ok(&want), "{s}");
        }
        for bad in [
            "",
            "0",
            "65536",
            "80/ICMP",
            "80/",
            "Http",
            "-http",
            "a_b",
            "/TCP",
            "x/y/z",
            "abcdefghijklmnop",
        ] {
            let e = bad.parse::<PortArg>().expect_err(bad);
            assert!(e.contains("expected N, N/TCP"), "{e}");
        }
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("web", "web"), 0);
        assert_eq!(edit_distance("web", "wbe"), 1);
        assert_eq!(edit_distance("client", "clinet"), 1);
        assert_eq!(edit_distance("wbe", "db"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}

// ---------------------------------------------------------------------------
// The mesh layer: what the destination's proxy decides.
// ---------------------------------------------------------------------------

/// The ports a proxy needs on the controller: destination and policy (8086), identity (8080).
pub const CONTROLLER_PORTS: [(u16, &str); 2] = [
    (8086, "destination and inbound policy"),
    (8080, "identity: its certificate"),
];

/// The label the chart gives the controller's pods.
pub const CONTROLLER_LABEL: (&str, &str) = ("app.kubernetes.io/name", "weft-controller");

/// What the controller's compilation needs besides the index, as the controller's flags say.
#[derive(Clone, Debug)]
pub struct MeshConfig {
    pub inbound: InboundConfig,
}

/// An HTTP request to decide (`--method`, `--path`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestArg {
    pub method: http::Method,
    pub path: String,
    /// Neither was given: `GET /` stands in because the server has routes.
    pub assumed: bool,
}

/// The mesh verdict of the connection (or request) at the destination's proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mesh {
    /// No proxy decides: the destination is not a meshed pod, or the protocol is not TCP.
    NotApplicable {
        reason: String,
    },
    Decided(Box<MeshDecision>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshDecision {
    /// `server/<ns>/<name>` or `default:<policy>`.
    pub server: String,
    /// `allow`, `deny`, `audit_deny` (allowed, counted as a denial) or `no_route` (404).
    pub result: &'static str,
    pub route: Option<String>,
    /// The deciding authorization when allowed.
    pub authorization: Option<String>,
    /// The client's mesh identity as the proxy would see it (None: unauthenticated).
    pub identity: Option<String>,
    pub client_ip: IpAddr,
    /// The client pod carries the Weft proxy.
    pub client_meshed: bool,
    /// The request decided, when decided per request (HTTP with routes, or --path/--method).
    pub request: Option<RequestArg>,
    pub audit: bool,
    /// Denied, but an authorization the client was judged against admits mesh identities:
    /// an identity (a meshed client) could be allowed.
    pub wants_identity: bool,
    /// The proxy's denial message, or what was left out of the policy.
    pub detail: Option<String>,
    pub notes: Vec<String>,
}

impl Mesh {
    /// Traffic passes the mesh layer (allowed, audited, or no proxy to decide).
    pub fn allows(&self) -> bool {
        match self {
            Mesh::NotApplicable { .. } => true,
            Mesh::Decided(d) => matches!(d.result, "allow" | "audit_deny"),
        }
    }
}

/// Decides the mesh layer with the controller's compilation
/// ([`inbound_server`]) and the proxy's own decision ([`decide`]). Pure.
pub fn mesh_verdict(
    state: &State,
    world: &World,
    verdict: &Verdict,
    config: &MeshConfig,
    request: Option<&RequestArg>,
) -> Mesh {
    let na = |reason: String| Mesh::NotApplicable { reason };
    let Some(dst_key) = &verdict.dst.pod else {
        return na(format!(
            "{} is not a pod in the cluster, so no Weft proxy decides",
            verdict.dst
        ));
    };
    let Some(dst) = world.pod(dst_key) else {
        return na(format!("{dst_key} is not in the cluster state"));
    };
    if !dst.meshed {
        return na(format!(
            "{dst_key} has no Weft proxy, so no mesh policy applies"
        ));
    }
    if verdict.protocol != Protocol::Tcp {
        return na(format!(
            "the Weft proxy handles TCP only; {} passes it by",
            verdict.protocol
        ));
    }
    let src_pod = verdict.src.pod.as_ref().and_then(|k| world.pod(k));
    let client_meshed = src_pod.is_some_and(|p| p.meshed);
    let client_ip = verdict
        .src
        .ip
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
    let mut notes = Vec::new();
    let opaque_port = dst.opaque_ports.contains(verdict.port);
    let identity = match src_pod {
        Some(p) if p.meshed && !opaque_port => Some(weft_model::spiffe_id(
            &config.inbound.trust_domain,
            &p.key.namespace,
            &p.service_account,
        )),
        Some(p) if p.meshed => {
            notes.push(format!(
                "{dst_key} lists port {} as opaque (config.weft.dev/opaque-ports): the client's proxy sends it without mTLS, so no identity is presented",
                verdict.port
            ));
            None
        }
        _ => None,
    };
    let (pb, _) = inbound_server(
        state,
        &dst_key.namespace,
        &dst_key.name,
        verdict.port,
        &config.inbound,
    );
    let compiled = compile(&pb);
    let policy = &compiled.policy;
    for p in &compiled.problems {
        notes.push(format!("left out by the proxy: {p}"));
    }
    let client = Client {
        id: identity.as_deref(),
        ip: client_ip,
    };
    // Routes are HTTP: an opaque server (or an opaque-listed port) is decided per connection.
    let opaque = policy.protocol == ServerProtocol::Opaque || opaque_port;
    let request = match request {
        Some(_) if opaque => {
            notes.push(format!(
                "{} is opaque to the proxy: decided per connection, --method/--path do not apply",
                policy.server
            ));
            None
        }
        Some(r) => Some(r.clone()),
        None if !opaque && !policy.routes.is_empty() => Some(RequestArg {
            method: http::Method::GET,
            path: "/".into(),
            assumed: true,
        }),
        None => None,
    };
    let decision = match &request {
        Some(r) => {
            let uri = r
                .path
                .parse::<http::Uri>()
                .unwrap_or_else(|_| http::Uri::from_static("/"));
            decide::request(policy, &client, &r.method, &uri, &http::HeaderMap::new())
        }
        None => decide::connection(policy, &client),
    };
    let route = decision.route().map(ToString::to_string);
    let result = match decision {
        Decision::NoRoute => "no_route",
        d => d.result(),
    };
    let detail = match decision {
        Decision::Deny { route } | Decision::AuditDeny { route } => {
            Some(decide::deny_detail(policy, route, &client))
        }
        Decision::NoRoute => Some(format!(
            "{}: no route of the server matches {}",
            policy.server,
            request
                .as_ref()
                .map(|r| format!("{} {}", r.method, r.path))
                .unwrap_or_default()
        )),
        Decision::Allow { .. } => None,
    };
    // The authorizations the client was judged against: the server's, and the route's.
    let route_authorizations = decision
        .route()
        .and_then(|label| policy.routes.iter().find(|r| &r.label == label))
        .map(|r| r.authorizations.as_slice())
        .unwrap_or_default();
    let wants_identity = matches!(decision, Decision::Deny { .. } | Decision::AuditDeny { .. })
        && identity.is_none()
        && policy
            .authorizations
            .iter()
            .chain(route_authorizations)
            .any(|a| {
                matches!(a.authn, Authn::Mesh { .. })
                    && (a.networks.is_empty() || a.networks.iter().any(|n| n.contains(client_ip)))
            });
    Mesh::Decided(Box::new(MeshDecision {
        server: policy.server.to_string(),
        result,
        route,
        authorization: decision.authorization().map(ToString::to_string),
        identity,
        client_ip,
        client_meshed,
        request,
        audit: policy.audit,
        wants_identity,
        detail,
        notes,
    }))
}

/// Where the two layers disagree in a way that breaks traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// `proxy-cannot-reach-controller`, `network-policy-denies`, `client-not-meshed`.
    pub kind: &'static str,
    pub message: String,
}

/// The warnings for `verdict` and `mesh` (see the README's NetworkPolicy section). Pure.
///
/// - `network-policy-denies`: an AuthorizationPolicy allows, but the NetworkPolicies drop the
///   connection before any proxy sees it (the AuthorizationPolicy reads as if it were
///   allowed). Not for default policies: `all-unauthenticated` allows everyone and says
///   nothing about this client.
/// - `client-not-meshed`: the mesh denies an unauthenticated client that an authorization
///   would admit with a mesh identity: the client pod has no proxy, so it never presents one.
/// - `proxy-cannot-reach-controller`: a meshed end's proxy needs the controller (8086:
///   discovery and its inbound policy; 8080: its certificate), and the NetworkPolicies deny
///   that connection. The app port being allowed is not enough: the destination's proxy
///   without its certificate cannot terminate mTLS, and without its policy enforces
///   `WEFT_PROXY_INBOUND_DEFAULT_POLICY` instead of what this command shows; the client's
///   proxy without a certificate cannot originate mTLS. (The proxy inbound port 4143 needs
///   no warning: the evaluator allows it wherever an app port is allowed, as the CNI does,
///   and the client's proxy connects to the app port, which the destination redirects.)
pub fn warnings(world: &World, verdict: &Verdict, mesh: &Mesh) -> Vec<Warning> {
    let mut out = Vec::new();
    if let Mesh::Decided(d) = mesh {
        // Only an explicit authorization (an AuthorizationPolicy) reads as "allowed"; a
        // default policy allowing everyone says nothing about this client.
        let explicit = d
            .authorization
            .as_deref()
            .filter(|a| d.result == "allow" && !a.starts_with("default:"));
        if let (Some(authorization), false) = (explicit, verdict.allowed) {
            out.push(Warning {
                kind: "network-policy-denies",
                message: format!(
                    "the mesh allows this ({authorization}), but NetworkPolicy denies it: the connection is dropped at L3/L4 before {} is consulted",
                    d.server
                ),
            });
        }
        if d.wants_identity && !d.client_meshed {
            let who = verdict
                .src
                .pod
                .as_ref()
                .map(|k| format!("{k} has no Weft proxy"))
                .unwrap_or_else(|| format!("{} is not a meshed pod", verdict.src));
            out.push(Warning {
                kind: "client-not-meshed",
                message: format!(
                    "{} admits mesh identities only on this path, and {who}, so it connects unauthenticated{}; inject the client (weft.dev/inject: enabled) or allow its network",
                    d.server,
                    if d.result == "audit_deny" { " (audit mode lets it through today; enforcing will deny it)" } else { " and is denied" }
                ),
            });
        }
    }
    let controllers: Vec<&Pod> = world
        .pods()
        .filter(|p| {
            p.labels.get(CONTROLLER_LABEL.0).map(String::as_str) == Some(CONTROLLER_LABEL.1)
        })
        .collect();
    for (role, end) in [("client", &verdict.src), ("destination", &verdict.dst)] {
        let Some(pod) = end.pod.as_ref().and_then(|k| world.pod(k)) else {
            continue;
        };
        if !pod.meshed || controllers.iter().any(|c| c.key == pod.key) {
            continue;
        }
        let mut ports = Vec::new();
        let mut why = BTreeSet::new();
        for (port, what) in CONTROLLER_PORTS {
            let denied: Vec<String> = controllers
                .iter()
                .filter_map(|c| {
                    let conn = Connection {
                        src: Peer::Pod(pod.key.clone()),
                        dst: Peer::Pod(c.key.clone()),
                        port,
                        protocol: Protocol::Tcp,
                    };
                    let v = netpol::evaluate(world, &conn).ok()?;
                    if v.allowed {
                        return None;
                    }
                    let side = match (&v.egress, &v.ingress) {
                        (DirectionVerdict::Denied { isolated_by }, _) => {
                            format!("egress of {} (isolated by {})", pod.key, keys(isolated_by))
                        }
                        (_, DirectionVerdict::Denied { isolated_by }) => {
                            format!("ingress of {} (isolated by {})", c.key, keys(isolated_by))
                        }
                        _ => "NetworkPolicy".into(),
                    };
                    Some(format!("{} denied by the {side}", c.key))
                })
                .collect();
            if !denied.is_empty() {
                ports.push(format!("{port}/TCP ({what})"));
                why.extend(denied);
            }
        }
        if !ports.is_empty() {
            out.push(Warning {
                kind: "proxy-cannot-reach-controller",
                message: format!(
                    "the {role}'s proxy ({}) needs the controller on {}, and NetworkPolicy denies it: {}; allow its egress to the controller's pods on 8086 and 8080",
                    pod.key,
                    ports.join(" and "),
                    why.into_iter().collect::<Vec<_>>().join("; ")
                ),
            });
        }
    }
    out
}
