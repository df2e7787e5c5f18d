//! `weft cni flows`: the node agent's live flow stream (`GET /flows` on its metrics port,
//! served to loopback clients only), filtered and printed one line per flow.
//!
//! `weft cni status`: each node agent's state (`GET /status`): readiness, last policy sync,
//! endpoints and their programs, policies, map fill levels, and the problems found. Only the
//! fields printed are read, so a newer or older agent still answers.
//!
//! The agent sends NDJSON records (see `weft_cni_agent::flows`); this reads them with one
//! plain GET ([`crate::agent_http`], no runtime needed for one stream), keeps the fields it
//! prints, and tolerates fields it does not know.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use serde_json::Value;

#[derive(Debug, clap::Args)]
pub struct CniArgs {
    #[command(subcommand)]
    pub command: CniCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum CniCommand {
    /// Stream the node's NetworkPolicy verdicts live: time, source, destination, protocol,
    /// verdict and the deciding policy (for a denial: the policies isolating the pod).
    ///
    /// Reads GET /flows from the weft-cni-agent on this node (loopback only). Stops on
    /// Ctrl-C, or after --count flows.
    Flows(FlowsArgs),
    /// Show each node agent's state: ready, last policy sync, endpoints and attached
    /// programs, policies, eBPF map fill levels, and problems to act on.
    ///
    /// Reads GET /status from every --agent given (default: this node's), or with
    /// --all-nodes from every agent pod the API server lists (your kubeconfig). Exits 1 when
    /// an agent cannot be reached or reports a problem, 2 when the API server cannot be asked.
    Status(StatusArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// An agent's metrics address; repeat for several nodes.
    #[arg(
        long = "agent",
        default_value = "127.0.0.1:9964",
        env = "WEFT_CNI_AGENT",
        value_delimiter = ','
    )]
    pub agents: Vec<String>,
    /// Ask every node: the weft-cni-agent pods (label app.kubernetes.io/name=weft-cni-agent)
    /// in --namespace, each at its pod address (the node's: the agent uses the host network)
    /// and --port. Instead of --agent.
    #[arg(long, conflicts_with = "agents")]
    pub all_nodes: bool,
    /// The control plane's namespace, for --all-nodes.
    #[arg(short = 'n', long, default_value = "weft")]
    pub namespace: String,
    /// The agents' metrics port, for --all-nodes (the chart's cni.metricsPort).
    #[arg(long, default_value_t = 9964)]
    pub port: u16,
    /// Output: text, or json (one array with each agent's answer, or its error).
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct FlowsArgs {
    /// The agent's metrics address.
    #[arg(long, default_value = "127.0.0.1:9964", env = "WEFT_CNI_AGENT")]
    pub agent: String,
    /// Only flows with a pod of this namespace at either end.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only flows with this pod at either end.
    #[arg(long)]
    pub pod: Option<String>,
    /// Only allowed or only denied flows.
    #[arg(long, value_parser = ["allow", "deny"])]
    pub verdict: Option<String>,
    /// Output: text (one line per flow) or json (the agent's records, one per line).
    #[arg(short = 'o', long = "output", default_value = "text", value_parser = ["text", "json"])]
    pub output: String,
    /// Stop after this many flows.
    #[arg(long)]
    pub count: Option<u64>,
}

/// Runs `weft cni ...`.
pub fn run(args: &CniArgs) -> ExitCode {
    match &args.command {
        CniCommand::Flows(f) => match flows(f, &mut std::io::stdout().lock()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("weft cni flows: {e}");
                ExitCode::FAILURE
            }
        },
        CniCommand::Status(a) => {
            let targets = if a.all_nodes {
                match discover_agents(&a.namespace, a.port) {
                    Ok(t) => t,
                    Err(e) => {
                        eprintln!("weft cni status: {e}");
                        return ExitCode::from(2);
                    }
                }
            } else {
                a.agents.iter().map(|x| (x.clone(), None)).collect()
            };
            let answers: Vec<(String, Result<NodeStatus, String>)> = targets
                .into_iter()
                .map(|(agent, problem)| {
                    let answer = match problem {
                        Some(p) => Err(p),
                        None => fetch_status(&agent),
                    };
                    (agent, answer)
                })
                .collect();
            let text = if a.output == "json" {
                status_json(&answers)
            } else {
                format_status(&answers)
            };
            print!("{text}");
            let healthy = answers
                .iter()
                .all(|(_, r)| r.as_ref().is_ok_and(|s| s.problems.is_empty()));
            if healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FlowsError {
    #[error("--agent {agent}: {reason}")]
    Agent { agent: String, reason: String },
    #[error("reading the flow stream from {agent}: {source}")]
    Read {
        agent: String,
        source: std::io::Error,
    },
    #[error("writing output: {0}")]
    Write(std::io::Error),
}

/// What `weft cni status` reads of an agent's `/status` (weft_cni_agent::status::NodeStatus).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct NodeStatus {
    pub node: String,
    #[serde(default)]
    pub version: String,
    pub ready: bool,
    pub last_sync: Option<String>,
    pub last_sync_age_seconds: Option<f64>,
    pub endpoints: usize,
    pub programs: StatusPrograms,
    pub policies: StatusPolicies,
    #[serde(default)]
    pub maps: Vec<StatusMap>,
    #[serde(default)]
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct StatusPrograms {
    pub object: String,
    pub attached_interfaces: usize,
    #[serde(default)]
    pub endpoints_not_attached: Vec<String>,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct StatusPolicies {
    pub network_policies: usize,
    pub programmed: usize,
}

#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
pub struct StatusMap {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub entries: u64,
    pub max_entries: u32,
}

/// The agents `--all-nodes` asks: each agent pod's `address:port`, or why it cannot be asked
/// (no address yet). An error says why the API server could not be listed.
pub fn discover_agents(
    namespace: &str,
    port: u16,
) -> Result<Vec<(String, Option<String>)>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    runtime.block_on(async {
        let config = kube::Config::infer()
            .await
            .map_err(|e| format!("no usable kubeconfig: {e}"))?;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config).map_err(|e| format!("{server}: {e}"))?;
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client, namespace);
        let selector = format!("{AGENT_LABEL}={AGENT_NAME}");
        let list = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            pods.list(&kube::api::ListParams::default().labels(&selector)),
        )
        .await
        .map_err(|_| format!("{server}: no answer within 10 s"))?
        .map_err(|e| format!("{server}: listing pods {selector} in namespace {namespace}: {e}"))?;
        Ok(agent_targets(&list.items, namespace, port))
    })
}

/// The label and value of the chart's agent pods.
pub const AGENT_LABEL: &str = "app.kubernetes.io/name";
pub const AGENT_NAME: &str = "weft-cni-agent";

/// Each agent pod's target, sorted by node: `podIP:port`, or the pod with why it has none.
pub fn agent_targets(
    pods: &[k8s_openapi::api::core::v1::Pod],
    namespace: &str,
    port: u16,
) -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, String, Option<String>)> = pods
        .iter()
        // The API server filtered by the selector already; a server that did not (or a
        // list from elsewhere) still yields only agents.
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(AGENT_LABEL))
                .map(String::as_str)
                == Some(AGENT_NAME)
        })
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| "(unscheduled)".into());
            let ip = p
                .status
                .as_ref()
                .and_then(|s| s.pod_ip.as_deref())
                .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
            match ip {
                Some(ip) => (node, std::net::SocketAddr::new(ip, port).to_string(), None),
                None => {
                    let why = format!(
                        "pod {namespace}/{name} on node {node} has no address yet \
                         (kubectl -n {namespace} describe pod {name})"
                    );
                    (node, format!("{namespace}/{name}"), Some(why))
                }
            }
        })
        .collect();
    out.sort();
    if out.is_empty() {
        return vec![(
            format!("{namespace}/{AGENT_LABEL}={AGENT_NAME}"),
            Some(format!(
                "no weft-cni-agent pods in namespace {namespace}: is the CNI installed \
                 (cni.enabled) in this namespace (-n)?"
            )),
        )];
    }
    out.into_iter().map(|(_, t, p)| (t, p)).collect()
}

/// GET /status from one agent.
pub fn fetch_status(agent: &str) -> Result<NodeStatus, String> {
    let body = crate::audit::http_get(agent, "/status", None).map_err(|reason| {
        format!(
            "--agent {agent}: {reason}; is weft-cni-agent running and its metrics port reachable?"
        )
    })?;
    serde_json::from_str(&body)
        .map_err(|e| format!("--agent {agent}: /status is not an agent's status ({e})"))
}

/// `-o json`: an array with each agent's address and its status or error.
pub fn status_json(answers: &[(String, Result<NodeStatus, String>)]) -> String {
    let items: Vec<Value> = answers
        .iter()
        .map(|(agent, r)| match r {
            Ok(s) => serde_json::json!({ "agent": agent, "status": s }),
            Err(e) => serde_json::json!({ "agent": agent, "error": e }),
        })
        .collect();
    serde_json::to_string_pretty(&items).unwrap_or_default() + "\n"
}

/// The text report: a block per node, ✔/✖ lines, a map table, then the problems.
pub fn format_status(answers: &[(String, Result<NodeStatus, String>)]) -> String {
    let mut out = String::new();
    let mark = |ok: bool| if ok { "✔" } else { "✖" };
    for (agent, r) in answers {
        let s = match r {
            Ok(s) => s,
            Err(e) => {
                out.push_str(&format!("{agent}\n  ✖ {e}\n\n"));
                continue;
            }
        };
        out.push_str(&format!(
            "node {} (agent {agent}, version {})\n",
            s.node, s.version
        ));
        let sync = match (&s.last_sync, s.last_sync_age_seconds) {
            (Some(t), Some(age)) => format!("policy last written {t} ({age:.1} s ago)"),
            _ => "policy never written".to_string(),
        };
        out.push_str(&format!(
            "  {} {}; {sync}\n",
            mark(s.ready && s.last_sync.is_some()),
            if s.ready { "ready" } else { "not ready" }
        ));
        let missing = s.programs.endpoints_not_attached.len();
        out.push_str(&format!(
            "  {} endpoints: {}, programs attached on {} interfaces{} (object {})\n",
            mark(missing == 0),
            s.endpoints,
            s.programs.attached_interfaces,
            if missing > 0 {
                format!(", {missing} endpoints without programs")
            } else {
                String::new()
            },
            s.programs.object
        ));
        out.push_str(&format!(
            "  ✔ policies: {} NetworkPolicies known, {} programmed on this node\n",
            s.policies.network_policies, s.policies.programmed
        ));
        if !s.maps.is_empty() {
            out.push_str("  maps:\n");
            let w = s.maps.iter().map(|m| m.name.len()).max().unwrap_or(0);
            for m in &s.maps {
                let ratio = if m.max_entries == 0 {
                    0.0
                } else {
                    m.entries as f64 / f64::from(m.max_entries)
                };
                out.push_str(&format!(
                    "    {:<w$}  {:<16} {:>8} / {:<8} {:>5.1} %\n",
                    m.name,
                    m.kind,
                    m.entries,
                    m.max_entries,
                    ratio * 100.0
                ));
            }
        }
        for p in &s.problems {
            out.push_str(&format!("  ✖ {p}\n"));
        }
        out.push('\n');
    }
    out
}

/// Streams flows from the agent into `out` until the stream ends or `--count` is reached.
pub fn flows(args: &FlowsArgs, out: &mut impl Write) -> Result<(), FlowsError> {
    let agent_err = |reason: String| FlowsError::Agent {
        agent: args.agent.clone(),
        reason,
    };
    let rsp = crate::agent_http::get(&args.agent, "/flows", "application/x-ndjson", None).map_err(
        |reason| agent_err(format!("{reason}; is weft-cni-agent running on this node?")),
    )?;
    let read_err = |source| FlowsError::Read {
        agent: args.agent.clone(),
        source,
    };
    let (status, chunked, mut reader) = (rsp.status, rsp.chunked, rsp.body);
    let code = status.split_whitespace().nth(1).unwrap_or("");
    if code != "200" {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        return Err(agent_err(format!("answered {status}: {}", body.trim())));
    }
    let mut seen = 0u64;
    let mut pending = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(read_err)? == 0 {
            return Ok(());
        }
        // In a chunked body, skip the chunk-size lines; records may span chunks.
        if chunked && is_chunk_size(&line) && pending.is_empty() {
            continue;
        }
        pending.push_str(&line);
        if !pending.ends_with('\n') {
            continue;
        }
        let text = std::mem::take(&mut pending);
        let Ok(record) = serde_json::from_str::<Value>(text.trim()) else {
            continue;
        };
        if !matches(&record, args) {
            continue;
        }
        let printed = if args.output == "json" {
            serde_json::to_string(&record).unwrap_or_default()
        } else {
            format_line(&record)
        };
        writeln!(out, "{printed}").map_err(FlowsError::Write)?;
        out.flush().map_err(FlowsError::Write)?;
        seen += 1;
        if args.count.is_some_and(|c| seen >= c) {
            return Ok(());
        }
    }
}

fn is_chunk_size(line: &str) -> bool {
    let t = line.trim_end_matches(['\r', '\n']);
    t.is_empty() || (t.len() <= 8 && t.chars().all(|c| c.is_ascii_hexdigit()))
}

/// The record passes the `--namespace`, `--pod` and `--verdict` filters.
pub fn matches(record: &Value, args: &FlowsArgs) -> bool {
    let ends = [&record["src"], &record["dst"]];
    if let Some(ns) = &args.namespace {
        if !ends.iter().any(|e| e["namespace"].as_str() == Some(ns)) {
            return false;
        }
    }
    if let Some(pod) = &args.pod {
        let ns_ok = |e: &Value| {
            args.namespace
                .as_deref()
                .is_none_or(|ns| e["namespace"].as_str() == Some(ns))
        };
        if !ends
            .iter()
            .any(|e| e["pod"].as_str() == Some(pod) && ns_ok(e))
        {
            return false;
        }
    }
    if let Some(v) = &args.verdict {
        if record["verdict"].as_str() != Some(v) {
            return false;
        }
    }
    true
}

fn end(v: &Value) -> String {
    let port = v["port"].as_u64().unwrap_or(0);
    match (v["namespace"].as_str(), v["pod"].as_str()) {
        (Some(ns), Some(pod)) => format!("{ns}/{pod}:{port}"),
        _ => {
            let ip = v["ip"].as_str().unwrap_or("?");
            if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            }
        }
    }
}

/// `TIME  SRC -> DST  PROTO  VERDICT  POLICY`.
pub fn format_line(r: &Value) -> String {
    let verdict = r["verdict"].as_str().unwrap_or("?");
    let deciding = match (verdict, r["policy"].as_str()) {
        ("allow", Some(p)) => format!("by {p}"),
        ("allow", None) => "not isolated".to_string(),
        _ => {
            let by: Vec<&str> = r["isolated_by"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if by.is_empty() {
                r["reason"].as_str().unwrap_or("").to_string()
            } else {
                format!("isolated by {}", by.join(", "))
            }
        }
    };
    format!(
        "{}  {} -> {}  {}  {}  {}",
        r["time"].as_str().unwrap_or("?"),
        end(&r["src"]),
        end(&r["dst"]),
        r["protocol"].as_str().unwrap_or("?"),
        verdict.to_uppercase(),
        deciding
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> FlowsArgs {
        FlowsArgs {
            agent: "127.0.0.1:9964".into(),
            namespace: None,
            pod: None,
            verdict: None,
            output: "text".into(),
            count: None,
        }
    }

    #[test]
    fn lines_name_pods_and_the_deciding_policy_and_filters_apply() {
        let deny: Value = serde_json::json!({
            "time": "2026-12-05T17:10:16.123Z", "verdict": "deny", "direction": "ingress",
            "protocol": "TCP",
            "src": {"ip": "10.250.9.9", "port": 40000},
            "dst": {"ip": "10.1.0.6", "port": 80, "namespace": "b", "pod": "web"},
            "reason": "no rule allows the peer", "policy": null, "isolated_by": ["b/deny-all"]
        });
        assert_eq!(
            format_line(&deny),
            "2026-12-05T17:10:16.123Z  10.250.9.9:40000 -> b/web:80  TCP  DENY  isolated by b/deny-all"
        );
        let mut allow = deny.clone();
        allow["verdict"] = "allow".into();
        allow["policy"] = "b/allow-web".into();
        assert!(format_line(&allow).ends_with("ALLOW  by b/allow-web"));

        let mut a = args();
        a.namespace = Some("b".into());
        assert!(matches(&deny, &a));
        a.pod = Some("db".into());
        assert!(!matches(&deny, &a));
        let mut a = args();
        a.verdict = Some("allow".into());
        assert!(!matches(&deny, &a) && matches(&allow, &a));
        assert!(is_chunk_size("1f4\r\n") && !is_chunk_size("{\"a\":1}\n"));
    }

    #[test]
    fn status_report_marks_problems_and_unreachable_agents() {
        let s: NodeStatus = serde_json::from_value(serde_json::json!({
            "node": "n1", "version": "0.1.0", "ready": true,
            "last_sync": "2026-12-05T22:00:00.000Z", "last_sync_age_seconds": 1.5,
            "endpoints": 2, "future_field": 1,
            "programs": {"object": "abc", "attached_interfaces": 1,
                         "endpoints_not_attached": ["c2/eth0 (lxc2)"]},
            "policies": {"network_policies": 3, "programmed": 1},
            "maps": [{"name": "weft_ct", "type": "lru_hash", "entries": 95, "max_entries": 100}],
            "problems": ["map weft_ct is 95 % full (95 of 100): new entries will fail or evict live ones"]
        }))
        .expect("an agent's status, with a field this version does not know");
        let answers = vec![
            ("10.0.0.1:9964".to_string(), Ok(s)),
            (
                "10.0.0.2:9964".to_string(),
                Err("--agent 10.0.0.2:9964: cannot connect".to_string()),
            ),
        ];
        let text = format_status(&answers);
        for want in [
            "node n1 (agent 10.0.0.1:9964, version 0.1.0)",
            "✔ ready; policy last written 2026-12-05T22:00:00.000Z (1.5 s ago)",
            "✖ endpoints: 2, programs attached on 1 interfaces, 1 endpoints without programs (object abc)",
            "3 NetworkPolicies known, 1 programmed on this node",
            "weft_ct  lru_hash               95 / 100       95.0 %",
            "✖ map weft_ct is 95 % full",
            "10.0.0.2:9964\n  ✖ --agent 10.0.0.2:9964: cannot connect",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let json: Value = serde_json::from_str(&status_json(&answers)).expect("json");
        assert_eq!(json[0]["status"]["node"], "n1");
        assert_eq!(json[1]["error"], "--agent 10.0.0.2:9964: cannot connect");
    }
}
