//! The two `weft-proxy` child processes: how they are configured (the
//! proxy's environment contract), started, watched, scraped and stopped.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::child::DemoChild;
use super::DemoError;
use crate::promtext::{self, Sample};

/// Names of the proxy's environment variables (see DESIGN.md, "The proxy's
/// environment").
pub mod env {
    pub const OUTBOUND_ADDR: &str = "WEFT_PROXY_OUTBOUND_ADDR";
    pub const INBOUND_ADDR: &str = "WEFT_PROXY_INBOUND_ADDR";
    pub const ADMIN_ADDR: &str = "WEFT_PROXY_ADMIN_ADDR";
    pub const OUTBOUND_FIXED_TARGET: &str = "WEFT_PROXY_OUTBOUND_FIXED_TARGET";
    pub const INBOUND_FIXED_TARGET: &str = "WEFT_PROXY_INBOUND_FIXED_TARGET";
    pub const LOG: &str = "WEFT_PROXY_LOG";
    pub const DESTINATION_ADDR: &str = "WEFT_PROXY_DESTINATION_ADDR";
    pub const NAMESPACE: &str = "WEFT_PROXY_NAMESPACE";
    pub const POD_NAME: &str = "WEFT_PROXY_POD_NAME";
    pub const SERVICE_ACCOUNT: &str = "WEFT_PROXY_SERVICE_ACCOUNT";
    pub const IDENTITY_ADDR: &str = "WEFT_PROXY_IDENTITY_ADDR";
    pub const IDENTITY_TOKEN_FILE: &str = "WEFT_PROXY_IDENTITY_TOKEN_FILE";
    pub const TRUST_ANCHORS: &str = "WEFT_PROXY_TRUST_ANCHORS";
}

/// The listen addresses of one proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyAddrs {
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

/// Everything needed to start one proxy.
#[derive(Debug, Clone)]
pub struct ProxySpec {
    /// `client` or `server`; names the log file and the table rows.
    pub name: &'static str,
    pub addrs: ProxyAddrs,
    pub outbound_target: Option<SocketAddr>,
    pub inbound_target: Option<SocketAddr>,
    pub log_filter: String,
    /// The controller's destination service: routes outbound HTTP by name.
    pub destination: Option<SocketAddr>,
    /// The namespace of the proxy's workload (short names resolve in it).
    pub namespace: Option<String>,
    /// The workload identity the proxy obtains a certificate for and uses for mTLS.
    pub identity: Option<ProxyIdentity>,
}

/// A proxy's workload identity: `spiffe://cluster.local/ns/<namespace>/sa/<service account>`
/// (the proxy derives it; the trust domain is its default), certified by the controller's
/// identity service on presentation of the ServiceAccount's token.
#[derive(Debug, Clone)]
pub struct ProxyIdentity {
    /// The controller's identity gRPC.
    pub addr: SocketAddr,
    pub service_account: String,
    pub pod_name: String,
    pub token_file: PathBuf,
    pub trust_anchors: PathBuf,
}

impl ProxySpec {
    /// The environment the proxy is started with, in a stable order.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut vars = vec![
            (env::OUTBOUND_ADDR, self.addrs.outbound.to_string()),
            (env::INBOUND_ADDR, self.addrs.inbound.to_string()),
            (env::ADMIN_ADDR, self.addrs.admin.to_string()),
        ];
        if let Some(t) = self.outbound_target {
            vars.push((env::OUTBOUND_FIXED_TARGET, t.to_string()));
        }
        if let Some(t) = self.inbound_target {
            vars.push((env::INBOUND_FIXED_TARGET, t.to_string()));
        }
        if let Some(d) = self.destination {
            vars.push((env::DESTINATION_ADDR, d.to_string()));
        }
        if let Some(ns) = &self.namespace {
            vars.push((env::NAMESPACE, ns.clone()));
        }
        if let Some(id) = &self.identity {
            vars.extend([
                (env::IDENTITY_ADDR, id.addr.to_string()),
                (env::SERVICE_ACCOUNT, id.service_account.clone()),
                (env::POD_NAME, id.pod_name.clone()),
                (env::IDENTITY_TOKEN_FILE, path_text(&id.token_file)),
                (env::TRUST_ANCHORS, path_text(&id.trust_anchors)),
            ]);
        }
        vars.push((env::LOG, self.log_filter.clone()));
        vars
    }
}

/// A path as an environment value. The demo's paths are under the temporary directory; were
/// `TMPDIR` not UTF-8, the lossy conversion would make the proxy exit naming a missing file,
/// which says what is wrong as well as a check here would.
fn path_text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Reserve `n` distinct free ports on 127.0.0.1.
///
/// The ports are released before returning so the proxies can bind them;
/// another process could take one in between, in which case the proxy fails
/// to bind and says so in its log. Holding all of them at once until now at
/// least keeps the six from colliding with each other.
pub use weft_proto::loopback::free_addrs as free_loopback_ports;

/// A running proxy child.
#[derive(Debug)]
pub struct ProxyProcess {
    pub spec: ProxySpec,
    pub child: DemoChild,
}

impl ProxyProcess {
    /// Start `bin` with the spec's environment, output in `<log_dir>/<name>-proxy.log`
    /// (see [`DemoChild`] for the process group and how it is stopped).
    pub fn spawn(bin: &Path, spec: ProxySpec, log_dir: &Path) -> Result<Self, DemoError> {
        let mut cmd = Command::new(bin);
        cmd.envs(spec.env());
        let log_path = log_dir.join(format!("{}-proxy.log", spec.name));
        let child = DemoChild::spawn(format!("{} proxy", spec.name), bin, cmd, log_path)?;
        Ok(Self { spec, child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// Resolves when the child exits (for watching it while the demo runs).
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.exited().await
    }

    /// Polls the proxy's `/ready` until 200, exit, `stop` or `timeout`.
    pub async fn wait_ready(
        &mut self,
        admin: &AdminClient,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<(), DemoError> {
        let addr = self.spec.addrs.admin;
        self.child.wait_ready(admin, addr, timeout, stop).await
    }

    pub fn exited_early(&self, status: ExitStatus) -> DemoError {
        self.child.exited_early(status)
    }

    /// SIGTERM, then SIGKILL after `grace`; how it ended, for the summary.
    pub async fn terminate(&mut self, grace: Duration) -> String {
        self.child.terminate(grace).await
    }
}

/// A small HTTP/1 client for the proxies' admin endpoints.
#[derive(Debug, Clone)]
pub struct AdminClient {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

/// Metrics pages larger than this are refused rather than buffered.
const MAX_ADMIN_BODY: usize = 8 << 20;

impl AdminClient {
    pub fn new(timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    /// `GET http://<addr><path>`: the status and body, or a one-line reason.
    pub async fn get(&self, addr: SocketAddr, path: &str) -> Result<(StatusCode, Bytes), String> {
        self.get_url(&format!("http://{addr}{path}")).await
    }

    /// `GET <url>` (plain `http://` only, e.g. a Prometheus server's API):
    /// the status and body, or a one-line reason naming the URL.
    pub async fn get_url(&self, url: &str) -> Result<(StatusCode, Bytes), String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        let fetch = async {
            let resp = self
                .client
                .get(uri)
                .await
                .map_err(|e| format!("GET {url}: {}", error_chain(&e)))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_ADMIN_BODY)
                .collect()
                .await
                .map_err(|e| format!("GET {url}: reading the body: {e}"))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, fetch)
            .await
            .unwrap_or_else(|_| Err(format!("GET {url}: no answer within {:?}", self.timeout)))
    }

    /// Scrape and parse `GET /metrics`.
    pub async fn metrics(&self, admin: SocketAddr) -> Result<Vec<Sample>, String> {
        let (status, body) = self.get(admin, "/metrics").await?;
        if status != StatusCode::OK {
            return Err(format!("GET http://{admin}/metrics answered {status}"));
        }
        let text = std::str::from_utf8(&body)
            .map_err(|e| format!("GET http://{admin}/metrics: not UTF-8: {e}"))?;
        promtext::parse(text).map_err(|e| format!("GET http://{admin}/metrics: {e}"))
    }
}

/// `e: cause: cause`, since hyper-util's top-level error says only "client
/// error (Connect)".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The default location of the proxy binary: next to the running `weft`.
pub fn default_proxy_bin() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let mut name = OsString::from("weft-proxy");
    name.push(std::env::consts::EXE_SUFFIX);
    Ok(exe.with_file_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_env_follows_the_contract() {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let spec = ProxySpec {
            name: "client",
            addrs: ProxyAddrs {
                outbound: a(1),
                inbound: a(2),
                admin: a(3),
            },
            outbound_target: Some(a(4)),
            inbound_target: None,
            log_filter: "warn".into(),
            destination: Some(a(5)),
            namespace: Some("demo".into()),
            identity: Some(ProxyIdentity {
                addr: a(6),
                service_account: "web".into(),
                pod_name: "web-0".into(),
                token_file: "/tmp/d/tokens/web.token".into(),
                trust_anchors: "/tmp/d/ca/trust-anchors.pem".into(),
            }),
        };
        assert_eq!(
            spec.env(),
            vec![
                ("WEFT_PROXY_OUTBOUND_ADDR", "127.0.0.1:1".to_string()),
                ("WEFT_PROXY_INBOUND_ADDR", "127.0.0.1:2".to_string()),
                ("WEFT_PROXY_ADMIN_ADDR", "127.0.0.1:3".to_string()),
                (
                    "WEFT_PROXY_OUTBOUND_FIXED_TARGET",
                    "127.0.0.1:4".to_string()
                ),
                ("WEFT_PROXY_DESTINATION_ADDR", "127.0.0.1:5".to_string()),
                ("WEFT_PROXY_NAMESPACE", "demo".to_string()),
                ("WEFT_PROXY_IDENTITY_ADDR", "127.0.0.1:6".to_string()),
                ("WEFT_PROXY_SERVICE_ACCOUNT", "web".to_string()),
                ("WEFT_PROXY_POD_NAME", "web-0".to_string()),
                (
                    "WEFT_PROXY_IDENTITY_TOKEN_FILE",
                    "/tmp/d/tokens/web.token".to_string()
                ),
                (
                    "WEFT_PROXY_TRUST_ANCHORS",
                    "/tmp/d/ca/trust-anchors.pem".to_string()
                ),
                ("WEFT_PROXY_LOG", "warn".to_string()),
            ]
        );
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_loopback_ports(6).expect("ports");
        let mut uniq: Vec<_> = ports.iter().map(SocketAddr::port).collect();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(uniq.len(), 6);
        assert!(ports.iter().all(|a| a.ip().is_loopback()));
    }

    #[tokio::test]
    async fn admin_client_reports_a_refused_connection() {
        let addr = free_loopback_ports(1).expect("port")[0];
        let err = AdminClient::new(Duration::from_secs(1))
            .metrics(addr)
            .await
            .expect_err("nothing listens");
        assert!(
            err.starts_with(&format!("GET http://{addr}/metrics: ")),
            "{err}"
        );
    }
}
