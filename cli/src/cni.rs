//! `weft cni flows`: the node agent's live flow stream (`GET /flows` on its metrics port,
//! served to loopback clients only), filtered and printed one line per flow.
//!
//! The agent sends NDJSON records (see `weft_cni_agent::flows`); this reads them with a
//! plain HTTP/1.1 request over a std TCP stream (no runtime needed for one stream), keeps
//! the fields it prints, and tolerates fields it does not know.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

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

/// Streams flows from the agent into `out` until the stream ends or `--count` is reached.
pub fn flows(args: &FlowsArgs, out: &mut impl Write) -> Result<(), FlowsError> {
    let agent_err = |reason: String| FlowsError::Agent {
        agent: args.agent.clone(),
        reason,
    };
    let addr: SocketAddr = args
        .agent
        .to_socket_addrs()
        .map_err(|e| agent_err(format!("not an address ({e})")))?
        .next()
        .ok_or_else(|| agent_err("resolves to no address".into()))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map_err(|e| {
        agent_err(format!(
            "cannot connect ({e}); is weft-cni-agent running on this node?"
        ))
    })?;
    let read_err = |source| FlowsError::Read {
        agent: args.agent.clone(),
        source,
    };
    // One write (as weft policy audit's reader): `write!` would send each piece on its own.
    let head = format!(
        "GET /flows HTTP/1.0\r\nHost: {}\r\nAccept: application/x-ndjson\r\nConnection: close\r\n\r\n",
        args.agent
    );
    (&stream).write_all(head.as_bytes()).map_err(read_err)?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(read_err)?;
    let code = status.split_whitespace().nth(1).unwrap_or("");
    let mut chunked = false;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).map_err(read_err)? == 0 || h.trim().is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if code != "200" {
        let mut body = String::new();
        let _ = std::io::Read::read_to_string(&mut reader, &mut body);
        return Err(agent_err(format!(
            "answered {}: {}",
            status.trim(),
            body.trim()
        )));
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
}
