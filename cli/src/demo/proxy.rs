//! The two `weft-proxy` child processes: how they are configured (the
//! proxy's environment contract), started, watched, scraped and stopped.

use std::ffi::OsString;
use std::fs::File;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
        vars.push((env::LOG, self.log_filter.clone()));
        vars
    }
}

/// Reserve `n` distinct free ports on 127.0.0.1.
///
/// The ports are released before returning so the proxies can bind them;
/// another process could take one in between, in which case the proxy fails
/// to bind and says so in its log. Holding all of them at once until now at
/// least keeps the six from colliding with each other.
pub fn free_loopback_ports(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| StdTcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners.iter().map(StdTcpListener::local_addr).collect()
}

/// A running proxy child.
#[derive(Debug)]
pub struct ProxyProcess {
    pub spec: ProxySpec,
    pub log_path: PathBuf,
    child: Child,
}

impl ProxyProcess {
    /// Start `bin` with the spec's environment, stdout and stderr appended
    /// to `<log_dir>/<name>-proxy.log`.
    ///
    /// The child gets its own process group so that a Ctrl-C in the terminal
    /// reaches only `weft demo`, which then stops the proxies in order
    /// (traffic first, then SIGTERM) instead of all at once.
    pub fn spawn(bin: &Path, spec: ProxySpec, log_dir: &Path) -> Result<Self, DemoError> {
        let log_path = log_dir.join(format!("{}-proxy.log", spec.name));
        let log = File::create(&log_path).map_err(|source| DemoError::LogFile {
            path: log_path.clone(),
            source,
        })?;
        let log_err = log.try_clone().map_err(|source| DemoError::LogFile {
            path: log_path.clone(),
            source,
        })?;
        let mut cmd = Command::new(bin);
        cmd.envs(spec.env())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            // If weft demo itself fails on the way out, the proxies must not
            // outlive it.
            .kill_on_drop(true);
        // kill_on_drop does not run when weft itself is killed or aborts
        // (release builds abort on panic); have the kernel send SIGTERM then.
        // The signal fires when the spawning *thread* exits: that is the
        // thread driving `demo::run` (the runtime's `block_on` thread or a
        // worker), which lives as long as the demo.
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe, allocating nothing.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = cmd.spawn().map_err(|source| DemoError::Spawn {
            bin: bin.to_path_buf(),
            source,
        })?;
        tracing::debug!(name = spec.name, pid = ?child.id(), ?log_path, "proxy started");
        Ok(Self {
            spec,
            log_path,
            child,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Resolves when the child exits (for watching it while the demo runs).
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Poll `GET /ready` until it answers 200, the child exits, `stop` fires
    /// or `timeout` passes.
    pub async fn wait_ready(
        &mut self,
        admin: &AdminClient,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<(), DemoError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.exited_early(status));
            }
            let last = match admin.get(self.spec.addrs.admin, "/ready").await {
                Ok((StatusCode::OK, _)) => return Ok(()),
                Ok((status, _)) => format!("answered {status}"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(DemoError::NotReady {
                    name: self.spec.name,
                    admin: self.spec.addrs.admin,
                    timeout,
                    last,
                    log: self.log_path.clone(),
                });
            }
            tokio::select! {
                () = stop.cancelled() => return Err(DemoError::Interrupted),
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    pub fn exited_early(&self, status: ExitStatus) -> DemoError {
        DemoError::ProxyExited {
            name: self.spec.name,
            status,
            log: self.log_path.clone(),
        }
    }

    /// Ask the proxy to stop with SIGTERM and wait for it; SIGKILL it if it
    /// has not exited within `grace`. Returns how it ended, for the summary.
    pub async fn terminate(&mut self, grace: Duration) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited ({status})");
        }
        if let Some(pid) = self.child.id() {
            sigterm(pid);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => "exited cleanly after SIGTERM".into(),
            Ok(Ok(status)) => format!("exited after SIGTERM with {status}"),
            Ok(Err(e)) => format!("could not be waited for: {e}"),
            Err(_) => {
                tracing::warn!(
                    name = self.spec.name,
                    ?grace,
                    "proxy ignored SIGTERM; killing it"
                );
                let _ = self.child.kill().await;
                format!("did not exit within {grace:?} of SIGTERM and was killed")
            }
        }
    }
}

fn sigterm(pid: u32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2) has no memory-safety preconditions. The pid is our own
    // child, not yet reaped (tokio reaps only in wait/try_wait, which have
    // just reported it running), so it cannot name another process.
    let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
    if rc != 0 {
        tracing::warn!(pid, error = %std::io::Error::last_os_error(), "could not send SIGTERM");
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
        let url = format!("http://{addr}{path}");
        let uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
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
