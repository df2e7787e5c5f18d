//! `weft tap`: a live stream of the requests chosen proxies handle.
//!
//! Each proxy is asked for `GET /tap?…` on its admin port (NDJSON, one object per request
//! and direction; see the proxy's `observe::tap`): the proxies are given by address
//! (`--to-proxies`) or found as the meshed pods of a manifest directory or the cluster
//! (`--source`, the same pod index `weft stat` reads, the admin port the injector gives the
//! proxy container). The streams are merged as lines arrive and printed one line per request:
//!
//! ```text
//! rsp proxy=web-0 dir=out :method=GET :authority=books.demo.svc.cluster.local:8080 :path=/books/1 :status=200 latency=1.9ms
//! ```
//!
//! `-o wide` adds `route=`, `endpoint=`, `src_id=` (the verified client), `dst_id=` (the
//! identity the endpoint proved), `retries=` and `bytes=`; a request the proxy answered
//! itself ends in `proxy_error=<weft-proxy-error>`. `-o json` prints the proxies' objects
//! with a `proxy` key added. When a proxy dropped events because this reader was slow a line
//! `dropped proxy=web-0 count=12` (JSON: `{"proxy":"web-0","dropped":12}`) says so, and the
//! total is repeated on stderr at the end.
//!
//! Proxies answer taps from loopback only, or over mTLS from the controller's identity, so
//! `weft tap` runs where the proxies' admin ports are on loopback (`weft demo`, or a
//! port-forward). Errors name the proxy and what failed; the exit status is then 2.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc;
use weft_controller::source::SourceConfig;
use weft_model::Kind;

use crate::stat::{pods_from_index, PodRef, ProxyArg};

/// `weft tap`.
#[derive(Debug, clap::Args)]
pub struct TapArgs {
    /// Tap these proxies' admin endpoints (host:port), each optionally named
    /// `[NAMESPACE/]POD=host:port`.
    #[arg(long, value_name = "ADDR", num_args = 1.., conflicts_with = "source")]
    pub to_proxies: Vec<ProxyArg>,
    /// Tap the meshed pods of a manifest directory (`dir:PATH`) or the cluster
    /// (`kube`), at their proxies' admin ports.
    #[arg(long, value_name = "kube|dir:PATH")]
    pub source: Option<SourceConfig>,
    /// With --source: only pods in this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Only requests to this authority: `host:port`, `host` (any port), or
    /// `.suffix` (any host ending with it).
    #[arg(long)]
    pub authority: Option<String>,
    /// Only requests whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    /// Only requests with this method.
    #[arg(long)]
    pub method: Option<String>,
    /// Only responses with this status (503) or class (5xx).
    #[arg(long)]
    pub status: Option<String>,
    /// Only this direction.
    #[arg(long, value_enum)]
    pub direction: Option<TapDirection>,
    /// Stop after this many requests (over all proxies).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
    /// Output: one line per request (default), `wide` with route, endpoint and
    /// identities, or `json` (the proxies' objects).
    #[arg(short, long, value_enum)]
    pub output: Option<TapOutput>,
    /// Seconds to wait for each proxy to accept the tap.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TapDirection {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TapOutput {
    Wide,
    Json,
}

/// Why `weft tap` stopped; each message names the proxy and what failed.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("proxy {proxy} ({addr}): {reason}")]
    Proxy {
        proxy: String,
        addr: String,
        reason: String,
    },
    #[error("{0}")]
    Manifests(#[from] crate::policy::ExplainError),
    #[error("no meshed pods with an IP address{} in {source_text}: nothing to tap", .namespace.as_ref().map(|n| format!(" in namespace {n}")).unwrap_or_default())]
    NoPods {
        source_text: String,
        namespace: Option<String>,
    },
    #[error("nothing to tap: give --to-proxies ADDR... or --source dir:PATH")]
    NoInput,
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// One proxy to tap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `namespace/pod`, `pod`, or the address.
    pub name: String,
    pub addr: String,
}

impl Target {
    fn of(pod: &PodRef) -> Option<Self> {
        let addr = pod.admin.clone()?;
        let name = match &pod.namespace {
            Some(ns) if pod.name != addr => format!("{ns}/{}", pod.name),
            _ => pod.name.clone(),
        };
        Some(Self { name, addr })
    }
}

/// The query string of `/tap` for these arguments (values percent-encoded).
pub fn query(args: &TapArgs) -> String {
    let mut q: Vec<String> = Vec::new();
    let mut push = |k: &str, v: &str| q.push(format!("{k}={}", encode(v)));
    if let Some(v) = &args.authority {
        push("authority", v);
    }
    if let Some(v) = &args.path {
        push("path_prefix", v);
    }
    if let Some(v) = &args.method {
        push("method", v);
    }
    if let Some(v) = &args.status {
        push("status", v);
    }
    if let Some(d) = args.direction {
        push(
            "direction",
            match d {
                TapDirection::Inbound => "inbound",
                TapDirection::Outbound => "outbound",
            },
        );
    }
    if let Some(n) = args.max {
        push("max", &n.to_string());
    }
    if let Some(s) = args.duration {
        push("duration", &format!("{s}s"));
    }
    q.join("&")
}

fn encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' | b':' => {
                o.push(char::from(b))
            }
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

fn str_of<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// One printed line for a proxy's tap object (an event or a drop report).
pub fn render(proxy: &str, v: &Value, output: Option<TapOutput>) -> String {
    if output == Some(TapOutput::Json) {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.insert("proxy".into(), Value::String(proxy.to_string()));
        }
        return v.to_string();
    }
    if let Some(n) = v.get("dropped").and_then(Value::as_u64) {
        return format!("dropped proxy={proxy} count={n}");
    }
    let dir = match str_of(v, "direction") {
        Some("inbound") => "in",
        Some("outbound") => "out",
        _ => "?",
    };
    let mut line =
        format!(
        "rsp proxy={proxy} dir={dir} :method={} :authority={} :path={} :status={} latency={:.1}ms",
        str_of(v, "method").unwrap_or("-"),
        str_of(v, "authority").filter(|a| !a.is_empty()).unwrap_or("-"),
        str_of(v, "path").unwrap_or("-"),
        v.get("status").and_then(Value::as_u64).unwrap_or(0),
        v.get("latency_ms").and_then(Value::as_f64).unwrap_or(0.0),
    );
    if let Some(g) = v.get("grpc_status").and_then(Value::as_u64) {
        line.push_str(&format!(" grpc-status={g}"));
    }
    if output == Some(TapOutput::Wide) {
        for (key, field) in [
            ("route", "route"),
            ("endpoint", "endpoint"),
            ("src_id", "client_id"),
            ("dst_id", "server_id"),
        ] {
            line.push_str(&format!(" {key}={}", str_of(v, field).unwrap_or("-")));
        }
        line.push_str(&format!(
            " retries={} bytes={} duration={:.1}ms",
            v.get("retries").and_then(Value::as_u64).unwrap_or(0),
            v.get("response_bytes").and_then(Value::as_u64).unwrap_or(0),
            v.get("duration_ms").and_then(Value::as_f64).unwrap_or(0.0),
        ));
    }
    if let Some(e) = str_of(v, "proxy_error") {
        line.push_str(&format!(" proxy_error={e}"));
    }
    line
}

/// What a proxy's tap task reports.
enum Report {
    Line(Value),
    Failed(TapError),
    Ended,
}

pub fn run(args: &TapArgs) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft tap: {e}");
            ExitCode::from(2)
        }
    }
}

fn targets(args: &TapArgs, timeout: Duration) -> Result<Vec<Target>, TapError> {
    if !args.to_proxies.is_empty() {
        return Ok(args
            .to_proxies
            .iter()
            .filter_map(|p| Target::of(&PodRef::from_arg(p)))
            .collect());
    }
    let Some(source) = &args.source else {
        return Err(TapError::NoInput);
    };
    let pods = match source {
        SourceConfig::Dir(dir) => {
            let index = crate::policy::load_manifests(dir)?;
            let state = index.read();
            pods_from_index(&state, args.namespace.as_deref())
        }
        SourceConfig::Kube => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(TapError::Runtime)?;
            let listed = runtime.block_on(crate::policy::list_kinds(
                timeout,
                &[Kind::Pod, Kind::Service],
                "pods and services",
            ))?;
            let state = listed.index.read();
            pods_from_index(&state, args.namespace.as_deref())
        }
    };
    let targets: Vec<Target> = pods.iter().filter_map(Target::of).collect();
    if targets.is_empty() {
        return Err(TapError::NoPods {
            source_text: source.to_string(),
            namespace: args.namespace.clone(),
        });
    }
    Ok(targets)
}

fn run_inner(args: &TapArgs) -> Result<(), TapError> {
    use std::io::Write;
    let timeout = Duration::from_secs(args.timeout);
    let targets = targets(args, timeout)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(TapError::Runtime)?;
    let query = query(args);
    runtime.block_on(async {
        let (tx, mut rx) = mpsc::channel(1024);
        // Every tap is open before anything prints: a refused one fails the command at once.
        let mut bodies = Vec::new();
        for t in &targets {
            bodies.push((t.clone(), open(t, &query, timeout).await?));
        }
        let n = bodies.len();
        for (t, body) in bodies {
            tokio::spawn(read(t, body, tx.clone()));
        }
        drop(tx);
        let mut out = std::io::stdout().lock();
        let (mut printed, mut dropped, mut ended) = (0u64, 0u64, 0usize);
        let mut failed = None;
        while let Some((proxy, report)) = rx.recv().await {
            match report {
                Report::Line(v) => {
                    let line = render(&proxy, &v, args.output);
                    if let Some(d) = v.get("dropped").and_then(Value::as_u64) {
                        dropped += d;
                    } else {
                        printed += 1;
                    }
                    // The reader of our stdout went away (`| head`): stop quietly.
                    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                        break;
                    }
                    if args.max.is_some_and(|m| printed >= m) {
                        break;
                    }
                }
                Report::Failed(e) => {
                    eprintln!("weft tap: {e}");
                    failed.get_or_insert(e);
                }
                Report::Ended => {
                    ended += 1;
                    tracing::debug!(%proxy, "tap ended");
                    if ended == n {
                        break;
                    }
                }
            }
        }
        if dropped > 0 {
            eprintln!(
                "weft tap: the proxies dropped {dropped} events because this reader was too slow"
            );
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    })?;
    // Stop now: the remaining streams' tasks are dropped with the runtime.
    runtime.shutdown_background();
    Ok(())
}

fn proxy_error(t: &Target, reason: impl Into<String>) -> TapError {
    TapError::Proxy {
        proxy: t.name.clone(),
        addr: t.addr.clone(),
        reason: reason.into(),
    }
}

/// Opens the tap on one proxy: the streaming body once the proxy answered 200.
async fn open(
    t: &Target,
    query: &str,
    timeout: Duration,
) -> Result<hyper::body::Incoming, TapError> {
    let addr: SocketAddr = match t.addr.parse() {
        Ok(a) => a,
        Err(_) => tokio::net::lookup_host(&t.addr)
            .await
            .map_err(|e| proxy_error(t, format!("cannot resolve: {e}")))?
            .next()
            .ok_or_else(|| proxy_error(t, "resolves to no address"))?,
    };
    let connect = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| proxy_error(t, format!("cannot connect to the admin port: {e}")))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| proxy_error(t, format!("HTTP handshake failed: {e}")))?;
        tokio::spawn(conn);
        let req = http::Request::get(format!("/tap?{query}"))
            .header(http::header::HOST, t.addr.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| proxy_error(t, format!("bad request: {e}")))?;
        let rsp = send
            .send_request(req)
            .await
            .map_err(|e| proxy_error(t, format!("GET /tap failed: {e}")))?;
        Ok::<_, TapError>(rsp)
    };
    let rsp = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| proxy_error(t, format!("no answer to GET /tap within {timeout:?}")))??;
    let status = rsp.status();
    if status != http::StatusCode::OK {
        let body = tokio::time::timeout(timeout, rsp.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        return Err(proxy_error(
            t,
            format!("GET /tap answered {status}: {body}"),
        ));
    }
    Ok(rsp.into_body())
}

/// Reads one proxy's NDJSON stream, line by line, into `tx`.
async fn read(t: Target, mut body: hyper::body::Incoming, tx: mpsc::Sender<(String, Report)>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let report = match serde_json::from_slice::<Value>(&line) {
                Ok(v) => Report::Line(v),
                Err(e) => Report::Failed(proxy_error(&t, format!("bad tap line: {e}"))),
            };
            if tx.send((t.name.clone(), report)).await.is_err() {
                return;
            }
        }
        match body.frame().await {
            None => break,
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => {
                let _ = tx
                    .send((
                        t.name.clone(),
                        Report::Failed(proxy_error(&t, format!("tap stream broke: {e}"))),
                    ))
                    .await;
                break;
            }
        }
    }
    let _ = tx.send((t.name.clone(), Report::Ended)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        tap: TapArgs,
    }

    fn args(a: &[&str]) -> TapArgs {
        let mut v = vec!["weft"];
        v.extend_from_slice(a);
        Cli::try_parse_from(v).unwrap().tap
    }

    #[test]
    fn filters_become_the_tap_query() {
        let a = args(&[
            "--to-proxies",
            "127.0.0.1:4191",
            "--authority",
            "books:8080",
            "--path",
            "/a b",
            "--method",
            "GET",
            "--status",
            "5xx",
            "--direction",
            "outbound",
            "--max",
            "3",
            "--duration",
            "10",
        ]);
        assert_eq!(
            query(&a),
            "authority=books:8080&path_prefix=/a%20b&method=GET&status=5xx&direction=outbound&max=3&duration=10s"
        );
        assert_eq!(query(&args(&["--to-proxies", "x:1"])), "");
    }

    #[test]
    fn proxies_are_named_by_pod_or_address() {
        let a = args(&[
            "--to-proxies",
            "demo/web-0=127.0.0.1:4191",
            "127.0.0.1:4192",
        ]);
        let t: Vec<_> = a
            .to_proxies
            .iter()
            .filter_map(|p| Target::of(&PodRef::from_arg(p)))
            .collect();
        assert_eq!(t[0].name, "demo/web-0");
        assert_eq!(t[1].name, "127.0.0.1:4192");
    }

    #[test]
    fn lines_show_the_request_and_the_proxy_error() {
        let v: Value = serde_json::from_str(
            r#"{"direction":"outbound","method":"GET","authority":"books:8080","path":"/b","status":502,
                "latency_ms":1.25,"duration_ms":1.5,"route":"httproute/demo/books/0","endpoint":"127.0.0.1:9",
                "client_id":null,"server_id":"spiffe://cluster.local/ns/demo/sa/books",
                "proxy_error":"connect-refused","retries":1,"response_bytes":12,"grpc_status":null}"#,
        )
        .unwrap();
        assert_eq!(
            render("web-0", &v, None),
            "rsp proxy=web-0 dir=out :method=GET :authority=books:8080 :path=/b :status=502 latency=1.2ms proxy_error=connect-refused"
        );
        assert_eq!(
            render("web-0", &v, Some(TapOutput::Wide)),
            "rsp proxy=web-0 dir=out :method=GET :authority=books:8080 :path=/b :status=502 latency=1.2ms route=httproute/demo/books/0 endpoint=127.0.0.1:9 src_id=- dst_id=spiffe://cluster.local/ns/demo/sa/books retries=1 bytes=12 duration=1.5ms proxy_error=connect-refused"
        );
        let j: Value = serde_json::from_str(&render("web-0", &v, Some(TapOutput::Json))).unwrap();
        assert_eq!(j["proxy"], "web-0");
        assert_eq!(j["status"], 502);
        let d: Value = serde_json::from_str(r#"{"dropped":4}"#).unwrap();
        assert_eq!(render("web-0", &d, None), "dropped proxy=web-0 count=4");
    }
}
