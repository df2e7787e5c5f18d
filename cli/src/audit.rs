//! `weft policy audit NAMESPACE`: the least-privilege policy for the traffic seen.
//!
//! Audit mode (a Server's `accessPolicy: audit`, or the `audit` default) lets everything
//! through and counts what it would deny; the proxies count every decision in
//! `weft_inbound_authz_total{server, route, authorization, client_id, result}`, and the CNI
//! agents report each connection's flow (source and destination pod or address, port,
//! protocol). From those samples this prints, as YAML ready for `kubectl apply -f -`:
//!
//! - one AuthorizationPolicy per Server of NAMESPACE (per namespace, `targetRef` kind
//!   Namespace, for ports that had only a default policy) listing exactly the mesh identities
//!   seen allowed or audit-denied, and, for unauthenticated clients, `unauthenticated: true`
//!   with the addresses the flows saw (`/32`, `/128`). The proxies' counters do not carry
//!   client addresses: without flows, unauthenticated traffic is reported in a comment only.
//! - one NetworkPolicy per destination workload of NAMESPACE (pods with the same labels, less
//!   the controllers' per-pod hashes) allowing exactly the (peer, port) pairs seen: a pod peer
//!   by its labels (and its namespace's name label when elsewhere), any other address as an
//!   ipBlock `/32` or `/128`. Needs the cluster state (`--source`) for the labels; a flow whose
//!   pods are not in it is left out with a comment.
//!
//! Comments say where each entry came from (the number of decisions or flows). What is left
//! out on purpose: denials (traffic refused while enforcing was not "seen to work"), the
//! controller's `default:probe` authorizations (kubelet probes are always allowed), and
//! client identities over the proxy's bound (`overflow`), each noted in a comment.
//!
//! The conversion from samples to objects is pure ([`authorization_policies`],
//! [`network_policies`], [`render`]); scraping and listing live at the edges ([`run`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_model::netpol::World;
use weft_model::{Labels, ObjectKey, Pod};

use crate::promtext;

/// The proxies' decision counter.
pub const AUTHZ_METRIC: &str = "weft_inbound_authz_total";

/// Labels that differ between pods of one workload and are not part of its selector.
const PER_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "statefulset.kubernetes.io/pod-name",
    "pod-template-generation",
    "apps.kubernetes.io/pod-index",
];

/// `weft policy audit`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// The namespace whose inbound traffic to write policy for.
    pub namespace: String,
    /// Admin addresses (host:port, usually POD_IP:4191) of the namespace's proxies, scraped
    /// for weft_inbound_authz_total. Without it, with --source: every meshed pod of the
    /// namespace on its IP and --admin-port.
    #[arg(long = "from-proxies", value_name = "ADDR", num_args = 1..)]
    pub from_proxies: Vec<String>,
    /// Cluster state for pod labels (NetworkPolicy peers and workloads) and for finding the
    /// proxies: `dir:PATH` (manifests) or `kube`.
    #[arg(long, value_name = "dir:PATH|kube")]
    pub source: Option<Source>,
    /// CNI agents (host:port of their metrics address; /flows is served to loopback only)
    /// whose live flows are read for --duration.
    #[arg(long, value_name = "ADDR", num_args = 1..)]
    pub agents: Vec<String>,
    /// Flow records as `weft cni flows -o json` prints them (NDJSON), `-` for stdin.
    #[arg(long, value_name = "FILE")]
    pub flows: Vec<PathBuf>,
    /// Seconds to read the agents' flows.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub duration: u64,
    /// The proxies' admin port, for the proxies found with --source.
    #[arg(long, value_name = "PORT", default_value_t = 4191)]
    pub admin_port: u16,
    /// Seconds to wait for the API server (with --source kube).
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub timeout: u64,
}

/// `--source`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Dir(PathBuf),
    Kube,
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("dir", path)) if !path.is_empty() => Ok(Source::Dir(path.into())),
            None if s == "kube" => Ok(Source::Kube),
            _ => Err(format!("{s:?}: expected dir:PATH or kube")),
        }
    }
}

/// One `weft_inbound_authz_total` series.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthzSample {
    /// `server/<ns>/<name>` or `default:<policy>`.
    pub server: String,
    pub route: String,
    pub authorization: String,
    /// The mesh identity, empty for unauthenticated clients, `overflow` past the bound.
    pub client_id: String,
    /// `allow`, `deny`, `audit_deny`.
    pub result: String,
    pub count: u64,
}

/// The `weft_inbound_authz_total` series of a Prometheus text exposition.
pub fn authz_samples(text: &str) -> Result<Vec<AuthzSample>, promtext::ParseError> {
    Ok(promtext::parse(text)?
        .into_iter()
        .filter(|s| s.name == AUTHZ_METRIC)
        .map(|s| {
            let l = |n: &str| s.label(n).unwrap_or_default().to_string();
            AuthzSample {
                server: l("server"),
                route: l("route"),
                authorization: l("authorization"),
                client_id: l("client_id"),
                result: l("result"),
                count: s.value.max(0.0) as u64,
            }
        })
        .collect())
}

/// A flow record, as the agent serves it (the fields used here).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub verdict: String,
    pub protocol: String,
    pub src: FlowPeer,
    pub dst: FlowPeer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowPeer {
    pub ip: IpAddr,
    pub port: u16,
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

impl FlowPeer {
    fn from_json(v: &Value) -> Option<FlowPeer> {
        let s = |k: &str| v[k].as_str().map(str::to_string);
        Some(FlowPeer {
            ip: v["ip"].as_str()?.parse().ok()?,
            port: u16::try_from(v["port"].as_u64()?).ok()?,
            namespace: s("namespace"),
            pod: s("pod"),
        })
    }

    fn key(&self) -> Option<ObjectKey> {
        Some(ObjectKey::new(
            self.namespace.as_deref()?,
            self.pod.as_deref()?,
        ))
    }
}

/// The flows of NDJSON text; lines that are not flows are skipped.
pub fn parse_flows(text: &str) -> Vec<Flow> {
    text.lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l.trim()).ok()?;
            Some(Flow {
                verdict: v["verdict"].as_str()?.to_string(),
                protocol: v["protocol"].as_str()?.to_string(),
                src: FlowPeer::from_json(&v["src"])?,
                dst: FlowPeer::from_json(&v["dst"])?,
            })
        })
        .collect()
}

/// A generated object: its YAML document (with comments).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doc {
    pub kind: &'static str,
    pub name: String,
    pub yaml: String,
}

/// A YAML scalar: JSON's string syntax is YAML's double-quoted style.
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn host_net(ip: IpAddr) -> String {
    let ip = ip.to_canonical();
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

/// A Kubernetes name from `parts`: lowercase alphanumerics and '-', at most 63 characters.
fn object_name(parts: &[&str]) -> String {
    let mut name: String = parts
        .join("-")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    while name.contains("--") {
        name = name.replace("--", "-");
    }
    let name = name.trim_matches('-');
    name.chars()
        .take(63)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// What one AuthorizationPolicy collects.
#[derive(Default)]
struct Seen {
    /// identity → (allowed, audit-denied, routes seen).
    identities: BTreeMap<String, (u64, u64, BTreeSet<String>)>,
    unauthenticated: u64,
    left_out: Vec<String>,
}

/// One AuthorizationPolicy per Server of `namespace` (one per namespace for default
/// policies) allowing exactly the identities seen; `flows` give the addresses of
/// unauthenticated clients (`reaches`: whether a flow's destination, pod and port, is the
/// target's, from the cluster state; `None` when unknown: then every flow to a pod of the
/// namespace counts). Pure.
pub fn authorization_policies(
    namespace: &str,
    samples: &[AuthzSample],
    flows: &[Flow],
    reaches: &dyn Fn(&Target, &Flow) -> Option<bool>,
) -> Vec<Doc> {
    let mut by_target: BTreeMap<Target, Seen> = BTreeMap::new();
    let mut other = Vec::new();
    for s in samples {
        let target = match Target::of(&s.server, namespace) {
            Some(t) => t,
            None => {
                other.push(s.server.clone());
                continue;
            }
        };
        let seen = by_target.entry(target).or_default();
        let what = format!(
            "{} {} of {} ({})",
            s.count,
            s.result,
            if s.client_id.is_empty() {
                "unauthenticated"
            } else {
                &s.client_id
            },
            if s.authorization.is_empty() {
                "no authorization"
            } else {
                &s.authorization
            }
        );
        if s.count == 0 {
            continue;
        }
        if s.result == "deny" {
            seen.left_out.push(format!("{what}: denied, not included"));
        } else if s.authorization == weft_controller::index::inbound::PROBE_AUTHORIZATION {
            seen.left_out
                .push(format!("{what}: kubelet probes, always allowed"));
        } else if s.client_id == "overflow" {
            seen.left_out.push(format!(
                "{what}: identities past the proxy's bound of distinct client_id labels; restart the proxies or audit fewer clients at once to see them"
            ));
        } else if s.client_id.is_empty() {
            seen.unauthenticated += s.count;
        } else {
            let e = seen.identities.entry(s.client_id.clone()).or_default();
            if s.result == "audit_deny" {
                e.1 += s.count;
            } else {
                e.0 += s.count;
            }
            if !s.route.is_empty() && !s.route.starts_with("default/") {
                e.2.insert(s.route.clone());
            }
        }
    }
    let mut docs = Vec::new();
    for (target, seen) in by_target {
        let (kind_group, kind, target_name) = match &target {
            Target::Server(name) => ("policy.weft.dev", "Server", name.as_str()),
            Target::Namespace(_) => ("", "Namespace", namespace),
        };
        let source = match &target {
            Target::Server(name) => format!("server/{namespace}/{name}"),
            Target::Namespace(policy) => format!("default:{policy}"),
        };
        let mut head = vec![format!(
            "# From the proxies' weft_inbound_authz_total for {source}."
        )];
        for l in &seen.left_out {
            head.push(format!("# Left out: {l}."));
        }
        let base = match &target {
            Target::Server(name) => name.clone(),
            Target::Namespace(_) => format!("{namespace}-default"),
        };
        if !seen.identities.is_empty() {
            let mut y = head.join("\n") + "\n";
            let name = object_name(&[&base, "audited"]);
            y += &format!(
                "apiVersion: policy.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  targetRef: {{group: {}, kind: {kind}, name: {}}}\n  identities:\n",
                q(&name),
                q(namespace),
                q(kind_group),
                q(target_name)
            );
            for (id, (allowed, audited, routes)) in &seen.identities {
                let routes = if routes.is_empty() {
                    String::new()
                } else {
                    format!(
                        " on {}",
                        routes.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                };
                let count = match (allowed, audited) {
                    (a, 0) => format!("{a} allowed"),
                    (0, d) => format!("{d} audit-denied (denied once enforced without this)"),
                    (a, d) => format!("{a} allowed, {d} audit-denied"),
                };
                y += &format!("  - {}  # {count}{routes}\n", q(id));
            }
            docs.push(Doc {
                kind: "AuthorizationPolicy",
                name,
                yaml: y,
            });
        } else if seen.unauthenticated == 0 {
            docs.push(Doc {
                kind: "comment",
                name: base.clone(),
                yaml: head.join("\n") + "\n# No traffic to allow: no AuthorizationPolicy.\n",
            });
        }
        if seen.unauthenticated > 0 {
            let name = object_name(&[&base, "audited", "unauthenticated"]);
            let mut from: BTreeMap<IpAddr, u64> = BTreeMap::new();
            for f in flows.iter().filter(|f| f.verdict == "allow") {
                let to_target = reaches(&target, f)
                    .unwrap_or_else(|| f.dst.namespace.as_deref() == Some(namespace));
                if to_target && f.protocol == "TCP" {
                    *from.entry(f.src.ip.to_canonical()).or_default() += 1;
                }
            }
            let mut y = format!(
                "# From the proxies' weft_inbound_authz_total for {source}: {} unauthenticated requests or connections.\n",
                seen.unauthenticated
            );
            if from.is_empty() {
                y += "# Their addresses are not in the proxies' counters and no flow shows them: pass --agents or --flows to list them. No policy written.\n";
                docs.push(Doc {
                    kind: "comment",
                    name,
                    yaml: y,
                });
                continue;
            }
            y += &format!(
                "# Addresses from the CNI's flows.\napiVersion: policy.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  targetRef: {{group: {}, kind: {kind}, name: {}}}\n  unauthenticated: true\n  networks:\n",
                q(&name),
                q(namespace),
                q(kind_group),
                q(target_name)
            );
            for (ip, n) in from {
                y += &format!("  - cidr: {}  # {n} flows\n", q(&host_net(ip)));
            }
            docs.push(Doc {
                kind: "AuthorizationPolicy",
                name,
                yaml: y,
            });
        }
    }
    other.sort();
    other.dedup();
    if !other.is_empty() {
        docs.push(Doc {
            kind: "comment",
            name: "other".into(),
            yaml: format!(
                "# Left out: servers of other namespaces in the scraped counters: {}.\n",
                other.join(", ")
            ),
        });
    }
    docs
}

/// What an AuthorizationPolicy targets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// A Server of the namespace, by name.
    Server(String),
    /// The namespace (ports with a default policy), with the policy's name.
    Namespace(String),
}

impl Target {
    /// From the metric's `server` label; `None` for a Server of another namespace.
    pub fn of(server: &str, namespace: &str) -> Option<Target> {
        if let Some(policy) = server.strip_prefix("default:") {
            return Some(Target::Namespace(policy.to_string()));
        }
        let rest = server.strip_prefix("server/")?;
        let (ns, name) = rest.split_once('/')?;
        (ns == namespace).then(|| Target::Server(name.to_string()))
    }
}

/// A workload's selector: its pod's labels without the per-pod ones.
fn workload_labels(pod: &Pod) -> Labels {
    pod.labels
        .iter()
        .filter(|(k, _)| !PER_POD_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn labels_yaml(labels: &Labels) -> String {
    let items: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{}: {}", q(k), q(v)))
        .collect();
    format!("{{matchLabels: {{{}}}}}", items.join(", "))
}

/// A peer of a NetworkPolicy rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum NetPeer {
    Pod { namespace: String, labels: Labels },
    Ip(IpAddr),
}

/// One NetworkPolicy per destination workload of `namespace` allowing exactly the (peer,
/// port) pairs of the allowed flows, with pod labels from `world`. Pure.
pub fn network_policies(namespace: &str, flows: &[Flow], world: &World) -> Vec<Doc> {
    // workload selector → (peer, port, protocol) → flows
    type Rules = BTreeMap<(NetPeer, u16, String), u64>;
    let mut workloads: BTreeMap<Labels, (BTreeSet<String>, Rules)> = BTreeMap::new();
    let mut left_out: BTreeMap<String, u64> = BTreeMap::new();
    for f in flows {
        if f.verdict != "allow" || f.dst.namespace.as_deref() != Some(namespace) {
            continue;
        }
        let Some(dst) = f.dst.key().and_then(|k| world.pod(&k)) else {
            *left_out
                .entry(format!(
                    "flows to {}/{} (not in the cluster state)",
                    namespace,
                    f.dst.pod.as_deref().unwrap_or("?")
                ))
                .or_default() += 1;
            continue;
        };
        if !matches!(f.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            *left_out
                .entry(format!("{} flows to {}", f.protocol, dst.key))
                .or_default() += 1;
            continue;
        }
        let peer = match f.src.key() {
            Some(k) => match world.pod(&k) {
                Some(p) => NetPeer::Pod {
                    namespace: k.namespace.clone(),
                    labels: workload_labels(p),
                },
                None => {
                    *left_out
                        .entry(format!("flows from {k} (not in the cluster state)"))
                        .or_default() += 1;
                    continue;
                }
            },
            None => NetPeer::Ip(f.src.ip.to_canonical()),
        };
        let w = workloads.entry(workload_labels(dst)).or_default();
        w.0.insert(dst.key.name.clone());
        *w.1.entry((peer, f.dst.port, f.protocol.clone()))
            .or_default() += 1;
    }
    let mut docs = Vec::new();
    for (labels, (pods, rules)) in workloads {
        let base = labels
            .get("app.kubernetes.io/name")
            .or_else(|| labels.get("app"))
            .cloned()
            .or_else(|| pods.iter().next().cloned())
            .unwrap_or_default();
        let name = object_name(&[&base, "audited"]);
        let mut y = format!(
            "# From the CNI's flows to {} pod(s) of this workload: {}.\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {}\n  namespace: {}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n",
            pods.len(),
            pods.iter().cloned().collect::<Vec<_>>().join(", "),
            q(&name),
            q(namespace),
            labels_yaml(&labels)
        );
        for ((peer, port, protocol), n) in rules {
            let from = match &peer {
                NetPeer::Pod {
                    namespace: ns,
                    labels,
                } if ns == namespace => format!("{{podSelector: {}}}", labels_yaml(labels)),
                NetPeer::Pod {
                    namespace: ns,
                    labels,
                } => format!(
                    "{{namespaceSelector: {{matchLabels: {{\"kubernetes.io/metadata.name\": {}}}}}, podSelector: {}}}",
                    q(ns),
                    labels_yaml(labels)
                ),
                NetPeer::Ip(ip) => format!("{{ipBlock: {{cidr: {}}}}}", q(&host_net(*ip))),
            };
            y += &format!(
                "  - from: [{from}]  # {n} flows\n    ports: [{{protocol: {protocol}, port: {port}}}]\n"
            );
        }
        docs.push(Doc {
            kind: "NetworkPolicy",
            name,
            yaml: y,
        });
    }
    if !left_out.is_empty() {
        let mut y = String::new();
        for (what, n) in left_out {
            y += &format!("# Left out: {n} {what}.\n");
        }
        docs.push(Doc {
            kind: "comment",
            name: "left-out".into(),
            yaml: y,
        });
    }
    docs
}

/// The documents as one YAML stream.
pub fn render(docs: &[Doc]) -> String {
    docs.iter()
        .map(|d| d.yaml.as_str())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Why `audit` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(
        "nothing to read: give --from-proxies ADDR..., or --source to find the namespace's proxies"
    )]
    NoProxies,
    #[error("scraping {addr}/metrics: {reason}; is it a proxy's admin address (POD_IP:4191)?")]
    Scrape { addr: String, reason: String },
    #[error("reading flows from {what}: {reason}")]
    Flows { what: String, reason: String },
}

/// GET `path` from `addr` over HTTP/1.0; the body (the status must be 200).
pub(crate) fn http_get(
    addr: &str,
    path: &str,
    read_for: Option<Duration>,
) -> Result<String, String> {
    let crate::agent_http::Response {
        status,
        chunked,
        body: mut reader,
    } = crate::agent_http::get(
        addr,
        path,
        "*/*",
        Some(read_for.unwrap_or(Duration::from_secs(10))),
    )?;
    let mut body = Vec::new();
    match read_for {
        None => {
            reader.read_to_end(&mut body).map_err(|e| e.to_string())?;
        }
        Some(d) => {
            // A stream: read until the deadline.
            let deadline = Instant::now() + d;
            let mut buf = [0u8; 8192];
            while Instant::now() < deadline {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => body.extend_from_slice(&buf[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        break
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    }
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!(
            "answered {}: {}",
            status.trim(),
            String::from_utf8_lossy(&body).trim()
        ));
    }
    if chunked {
        body = dechunk(&body);
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The data of a chunked body, up to where it was cut (a stream read until a deadline ends
/// mid-chunk).
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok());
        let Some(size) = size.filter(|n| *n > 0) else {
            break;
        };
        let data = &b[eol + 2..];
        let take = size.min(data.len());
        out.extend_from_slice(&data[..take]);
        if take < size || data.len() < size + 2 {
            break;
        }
        b = &data[size + 2..];
    }
    out
}

/// Runs `weft policy audit`; prints the YAML on stdout.
pub fn run(args: &AuditArgs) -> ExitCode {
    match run_audit(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "weft policy audit: {}",
                weft_proto::report::chain(e.chain())
            );
            ExitCode::from(2)
        }
    }
}

fn run_audit(args: &AuditArgs) -> anyhow::Result<()> {
    let index = match &args.source {
        None => None,
        Some(Source::Dir(dir)) => Some(crate::policy::load_manifests(dir)?),
        Some(Source::Kube) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Some(
                runtime
                    .block_on(crate::policy::list_kinds(
                        Duration::from_secs(args.timeout),
                        &[
                            weft_model::Kind::Pod,
                            weft_model::Kind::Namespace,
                            weft_model::Kind::Server,
                        ],
                        "pods, namespaces and Servers",
                    ))?
                    .index,
            )
        }
    };
    let world = index.as_ref().map(crate::policy::world_from_index);
    let mut proxies = args.from_proxies.clone();
    if proxies.is_empty() {
        if let Some(world) = &world {
            proxies = world
                .pods()
                .filter(|p| p.key.namespace == args.namespace && p.meshed && !p.terminated)
                .filter_map(|p| p.ips.first())
                .map(|ip| SocketAddr::new(*ip, args.admin_port).to_string())
                .collect();
        }
    }
    if proxies.is_empty() && args.agents.is_empty() && args.flows.is_empty() {
        return Err(AuditError::NoProxies.into());
    }
    let mut samples = Vec::new();
    for addr in &proxies {
        let text = http_get(addr, "/metrics", None).map_err(|reason| AuditError::Scrape {
            addr: addr.clone(),
            reason,
        })?;
        samples.extend(authz_samples(&text).map_err(|e| AuditError::Scrape {
            addr: addr.clone(),
            reason: e.to_string(),
        })?);
    }
    let mut flows = Vec::new();
    for path in &args.flows {
        let text = if path.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        } else {
            std::fs::read_to_string(path)
        }
        .map_err(|e| AuditError::Flows {
            what: path.display().to_string(),
            reason: e.to_string(),
        })?;
        flows.extend(parse_flows(&text));
    }
    for addr in &args.agents {
        let text = http_get(addr, "/flows", Some(Duration::from_secs(args.duration))).map_err(
            |reason| AuditError::Flows {
                what: addr.clone(),
                reason,
            },
        )?;
        flows.extend(parse_flows(&text));
    }
    let state = index.as_ref().map(|i| i.read());
    // A flow reaches a Server when the Server selects its destination pod and port, and the
    // namespace's default when no Server does.
    let reaches = |t: &Target, f: &Flow| -> Option<bool> {
        let state = state.as_ref()?;
        let pod = world.as_ref()?.pod_by_ip(f.dst.ip);
        let Some(pod) = pod.filter(|p| p.key.namespace == args.namespace) else {
            return Some(false);
        };
        let selecting = weft_controller::index::inbound::selecting_server(state, pod, f.dst.port);
        Some(match t {
            Target::Server(name) => selecting.is_some_and(|s| s.meta.key.name == *name),
            Target::Namespace(_) => selecting.is_none(),
        })
    };
    let mut docs = authorization_policies(&args.namespace, &samples, &flows, &reaches);
    match &world {
        Some(world) => docs.extend(network_policies(&args.namespace, &flows, world)),
        None if !flows.is_empty() => docs.push(Doc {
            kind: "comment",
            name: "no-state".into(),
            yaml: "# No NetworkPolicy: the flows name pods, and their labels need --source.\n"
                .into(),
        }),
        None => {}
    }
    let mut out = std::io::stdout().lock();
    out.write_all(render(&docs).as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use weft_model::netpol::{self, Connection, Peer, Protocol};

    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/front/sa/web";
    const BATCH: &str = "spiffe://cluster.local/ns/ops/sa/batch";

    fn metrics() -> String {
        let line = |server: &str, route: &str, authz: &str, id: &str, result: &str, n: u64| {
            format!("{AUTHZ_METRIC}{{server=\"{server}\",route=\"{route}\",authorization=\"{authz}\",client_id=\"{id}\",result=\"{result}\"}} {n}\n")
        };
        [
            "# HELP weft_inbound_authz_total Inbound authorization decisions.\n".to_string(),
            "# TYPE weft_inbound_authz_total counter\n".into(),
            line(
                "server/shop/api-http",
                "httproute/shop/books/0",
                "",
                WEB,
                "audit_deny",
                7,
            ),
            line(
                "server/shop/api-http",
                "",
                "authorizationpolicy/shop/x",
                BATCH,
                "allow",
                2,
            ),
            line(
                "server/shop/api-http",
                "default/shop/default/0",
                "default:probe",
                "",
                "allow",
                40,
            ),
            line(
                "server/shop/api-http",
                "",
                "",
                "spiffe://cluster.local/ns/evil/sa/x",
                "deny",
                1,
            ),
            line("server/shop/api-http", "", "", "overflow", "audit_deny", 3),
            line("default:audit", "", "", "", "audit_deny", 5),
            line("server/other/db", "", "", WEB, "audit_deny", 1),
            "weft_inbound_policy_streams 2\n".into(),
        ]
        .concat()
    }

    fn flow(src: (&str, Option<(&str, &str)>), dst: (&str, u16, &str, &str)) -> Flow {
        Flow {
            verdict: "allow".into(),
            protocol: "TCP".into(),
            src: FlowPeer {
                ip: src.0.parse().unwrap_or_else(|_| unreachable!()),
                port: 40000,
                namespace: src.1.map(|s| s.0.into()),
                pod: src.1.map(|s| s.1.into()),
            },
            dst: FlowPeer {
                ip: dst.0.parse().unwrap_or_else(|_| unreachable!()),
                port: dst.1,
                namespace: Some(dst.2.into()),
                pod: Some(dst.3.into()),
            },
        }
    }

    fn authz_docs(docs: &[Doc]) -> Vec<weft_model::authz::AuthorizationPolicy> {
        docs.iter()
            .filter(|d| d.kind == "AuthorizationPolicy")
            .map(|d| {
                let a: weft_model::authz::AuthorizationPolicy =
                    serde_yaml_ng::from_str(&d.yaml).unwrap_or_else(|e| panic!("{e}\n{}", d.yaml));
                weft_model::convert::authorization_policy(&a, "")
                    .unwrap_or_else(|e| panic!("{e}\n{}", d.yaml));
                a
            })
            .collect()
    }

    #[test]
    fn reads_the_decision_counter() {
        let samples = authz_samples(&metrics()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(samples.len(), 7);
        assert_eq!(
            samples[0],
            AuthzSample {
                server: "server/shop/api-http".into(),
                route: "httproute/shop/books/0".into(),
                authorization: String::new(),
                client_id: WEB.into(),
                result: "audit_deny".into(),
                count: 7,
            }
        );
    }

    #[test]
    fn one_authorization_policy_per_server_with_exactly_the_identities_seen() {
        let samples = authz_samples(&metrics()).unwrap_or_else(|e| panic!("{e}"));
        let flows = [
            flow(("10.1.5.5", None), ("10.1.0.10", 8080, "shop", "api")),
            flow(("10.1.5.5", None), ("10.1.0.10", 8080, "shop", "api")),
            flow(("fd00::7", None), ("10.1.0.11", 8080, "shop", "cart")),
            flow(("10.1.5.6", None), ("10.9.0.1", 80, "elsewhere", "x")),
        ];
        let docs = authorization_policies("shop", &samples, &flows, &|_, _| None);
        let text = render(&docs);
        let policies = authz_docs(&docs);
        assert_eq!(policies.len(), 2, "{text}");
        let server = &policies[0];
        assert_eq!(server.metadata.name.as_deref(), Some("api-http-audited"));
        assert_eq!(server.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(server.spec.target_ref.kind, "Server");
        assert_eq!(server.spec.target_ref.name, "api-http");
        assert_eq!(server.spec.identities, [WEB, BATCH]);
        assert!(!server.spec.unauthenticated && server.spec.networks.is_empty());
        // The namespace default's unauthenticated clients, with the flows' addresses.
        let ns = &policies[1];
        assert_eq!(ns.spec.target_ref.kind, "Namespace");
        assert_eq!(ns.spec.target_ref.name, "shop");
        assert!(ns.spec.unauthenticated && ns.spec.identities.is_empty());
        let nets: Vec<&str> = ns.spec.networks.iter().map(|n| n.cidr.as_str()).collect();
        assert_eq!(nets, ["10.1.5.5/32", "fd00::7/128"], "{text}");
        // Comments say where each entry came from, and what was left out.
        for want in [
            &format!("  - \"{WEB}\"  # 7 audit-denied (denied once enforced without this) on httproute/shop/books/0\n"),
            &format!("  - \"{BATCH}\"  # 2 allowed\n"),
            "# Left out: 40 allow of unauthenticated (default:probe): kubelet probes, always allowed.\n",
            "# Left out: 1 deny of spiffe://cluster.local/ns/evil/sa/x (no authorization): denied, not included.\n",
            "# Left out: 3 audit_deny of overflow",
            "  - cidr: \"10.1.5.5/32\"  # 2 flows\n",
            "# Left out: servers of other namespaces in the scraped counters: server/other/db.\n",
        ] {
            assert!(text.contains(want), "{want}\n---\n{text}");
        }
    }

    #[test]
    fn unauthenticated_traffic_without_flows_is_a_comment_not_a_policy() {
        let samples = authz_samples(&metrics()).unwrap_or_else(|e| panic!("{e}"));
        let docs = authorization_policies("shop", &samples, &[], &|_, _| None);
        assert_eq!(authz_docs(&docs).len(), 1);
        assert!(render(&docs).contains("5 unauthenticated requests or connections.\n# Their addresses are not in the proxies' counters"));
    }

    const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: front}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api, pod-template-hash: abc}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: shop, labels: {app: api, pod-template-hash: def}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: worker, namespace: shop, labels: {app: worker}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.0.12}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: front, labels: {app: web}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.3.2}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: front, labels: {app: other}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.3.3}
"#;

    #[test]
    fn network_policies_allow_exactly_the_flows_seen() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(dir.path().join("w.yaml"), WORLD).unwrap_or_else(|e| panic!("{e}"));
        let index = crate::policy::load_manifests(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let world = crate::policy::world_from_index(&index);
        let flows = [
            flow(
                ("10.1.3.2", Some(("front", "web"))),
                ("10.1.0.10", 8080, "shop", "api-1"),
            ),
            flow(
                ("10.1.3.2", Some(("front", "web"))),
                ("10.1.0.11", 8080, "shop", "api-2"),
            ),
            flow(
                ("10.1.0.12", Some(("shop", "worker"))),
                ("10.1.0.10", 9090, "shop", "api-1"),
            ),
            flow(("192.168.7.1", None), ("10.1.0.12", 53, "shop", "worker")),
            flow(
                ("10.1.3.2", Some(("front", "gone"))),
                ("10.1.0.10", 8080, "shop", "api-1"),
            ),
        ];
        let mut flows = flows.to_vec();
        flows[3].protocol = "UDP".into();
        let docs = network_policies("shop", &flows, &world);
        let text = render(&docs);
        let policies: Vec<netpol::NetworkPolicy> = docs
            .iter()
            .filter(|d| d.kind == "NetworkPolicy")
            .map(|d| {
                let np: k8s_openapi::api::networking::v1::NetworkPolicy =
                    serde_yaml_ng::from_str(&d.yaml).unwrap_or_else(|e| panic!("{e}\n{}", d.yaml));
                netpol::network_policy(&np, "").unwrap_or_else(|e| panic!("{e}\n{}", d.yaml))
            })
            .collect();
        assert_eq!(policies.len(), 2, "{text}");
        assert!(
            text.contains("# Left out: 1 flows from front/gone (not in the cluster state).\n"),
            "{text}"
        );
        assert!(
            text.contains("# From the CNI's flows to 2 pod(s) of this workload: api-1, api-2.\n"),
            "{text}"
        );
        // With the generated policies applied, exactly the flows seen pass.
        let state = index.read();
        let world = World::new(
            state.namespaces.values().map(|n| (**n).clone()),
            state.pods.values().map(|p| (**p).clone()),
            policies,
        );
        let allowed = |src: Peer, dst: &str, port: u16, protocol: Protocol| {
            let conn = Connection {
                src,
                dst: Peer::Pod(ObjectKey::new("shop", dst)),
                port,
                protocol,
            };
            netpol::evaluate(&world, &conn)
                .unwrap_or_else(|e| panic!("{e}"))
                .allowed
        };
        let pod = |ns: &str, name: &str| Peer::Pod(ObjectKey::new(ns, name));
        let ip = |s: &str| Peer::Ip(s.parse().unwrap_or_else(|_| unreachable!()));
        assert!(allowed(pod("front", "web"), "api-1", 8080, Protocol::Tcp));
        assert!(allowed(pod("front", "web"), "api-2", 8080, Protocol::Tcp));
        assert!(allowed(pod("shop", "worker"), "api-2", 9090, Protocol::Tcp));
        assert!(allowed(ip("192.168.7.1"), "worker", 53, Protocol::Udp));
        assert!(!allowed(
            pod("front", "other"),
            "api-1",
            8080,
            Protocol::Tcp
        ));
        assert!(!allowed(pod("front", "web"), "api-1", 9090, Protocol::Tcp));
        assert!(!allowed(pod("front", "web"), "worker", 53, Protocol::Udp));
        assert!(!allowed(ip("192.168.7.2"), "worker", 53, Protocol::Udp));
        assert!(!allowed(ip("192.168.7.1"), "worker", 53, Protocol::Tcp));
    }

    #[test]
    fn dechunks_a_cut_stream() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
        // A record split over two chunks, and a stream cut inside the last chunk.
        assert_eq!(dechunk(b"2\r\n{\"\r\n3\r\na\":\r\n5\r\n1}"), b"{\"a\":1}");
        assert_eq!(dechunk(b""), b"");
    }

    #[test]
    fn names_and_targets() {
        assert_eq!(object_name(&["API_http", "audited"]), "api-http-audited");
        assert_eq!(object_name(&[&"x".repeat(70)]).len(), 63);
        assert_eq!(
            Target::of("server/shop/a", "shop"),
            Some(Target::Server("a".into()))
        );
        assert_eq!(Target::of("server/other/a", "shop"), None);
        assert_eq!(
            Target::of("default:audit", "shop"),
            Some(Target::Namespace("audit".into()))
        );
        assert_eq!(
            host_net("::ffff:10.0.0.1".parse().unwrap_or_else(|_| unreachable!())),
            "10.0.0.1/32"
        );
    }
}
