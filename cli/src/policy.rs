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
//! Exit status: 0 allowed, 1 denied, 2 error (a bad argument, manifest or
//! cluster connection), so scripts can `weft policy explain ... && ...`.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_controller::index::Index;
use weft_controller::metrics::{KindLabels, Metrics};
use weft_controller::source::dir::{DirError, DirSource, ManifestError};
use weft_controller::source::{self, Readiness};
use weft_model::netpol::{
    self, Connection, Direction, DirectionVerdict, EvalError, Peer, Protocol, Resolved, Verdict,
    World,
};
use weft_model::{Kind, ObjectKey, Pod};

/// `weft policy ...`.
#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Explain whether NetworkPolicies allow a connection, and which policy and rule decided.
    ///
    /// Evaluates Kubernetes NetworkPolicy semantics (the reference the
    /// Weft CNI's datapath is tested against) for a new connection from
    /// --from to --to on --port. Reads the cluster (KUBECONFIG or the
    /// in-cluster service account; list/watch on pods, namespaces and
    /// networkpolicies) or, with --manifests, a directory of YAML/JSON
    /// manifests. Exit status: 0 allowed, 1 denied, 2 error.
    Explain(ExplainArgs),
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
        if v.allowed { "allowed" } else { "denied" },
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
    out
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
/// {"verdict": "allowed" | "denied", "allowed": bool, "loopback": bool,
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
    json!({
        "verdict": if v.allowed { "allowed" } else { "denied" },
        "allowed": v.allowed,
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

/// Lists Pods, Namespaces and NetworkPolicies once with the kube source
/// (`kube::Client::try_default`'s configuration: KUBECONFIG, else
/// in-cluster).
pub async fn list_cluster(timeout: Duration) -> Result<Listed, ExplainError> {
    list_kinds(
        timeout,
        &[Kind::Pod, Kind::Namespace, Kind::NetworkPolicy],
        "pods, namespaces and NetworkPolicies",
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
    let PolicyCommand::Explain(args) = &args.command;
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
    let mut stdout = std::io::stdout().lock();
    match args.output {
        Output::Text => stdout.write_all(render_text(&explanation).as_bytes())?,
        Output::Json => {
            serde_json::to_writer_pretty(&mut stdout, &render_json(&explanation))?;
            stdout.write_all(b"\n")?;
        }
    }
    stdout.flush()?;
    Ok(explanation.verdict.allowed)
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
