//! Support for Weft's end-to-end tests: run real `weft-proxy` processes, wait for readiness,
//! scrape and query their metrics, and small loopback servers.
//!
//! Tiers (see tests/README.md): loopback tests in `tests/tests/loopback_*.rs` need nothing but
//! the built binaries; network-namespace tests in `tests/tests/netns_*.rs` need root and fail
//! loudly (instead of skipping) when `CI=true`.
//!
//! The binaries must be built first (`cargo build --bins`); `scripts/test.sh` does that.

pub mod client;
pub mod controller;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod policy_server;
pub mod servers;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The directory holding this build's binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test-binary>
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary, failing with instructions when it was not built.
pub fn bin(name: &str) -> Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} not found: build the binaries first (cargo build --bins, as scripts/test.sh does)",
            p.display()
        );
    }
    Ok(p)
}

/// A free loopback port that no outgoing connection will take before the process under
/// test binds it (see [`weft_proto::loopback`]).
pub fn free_port() -> Result<u16> {
    Ok(free_addr()?.port())
}

pub fn free_addr() -> Result<SocketAddr> {
    Ok(weft_proto::loopback::free_addr()?)
}

/// A running `weft-proxy` process, killed on drop.
#[derive(Debug)]
pub struct Proxy {
    pub child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

/// How to start a proxy on loopback.
#[derive(Debug, Default, Clone)]
pub struct ProxyOpts {
    pub outbound_target: Option<SocketAddr>,
    pub inbound_target: Option<SocketAddr>,
    pub env: Vec<(String, String)>,
    /// Where the proxy's stdout goes (its access log); inherited when `None`.
    pub stdout: Option<std::path::PathBuf>,
}

impl Proxy {
    /// Starts a proxy on free loopback ports and waits until `/ready` answers 200.
    pub fn start(opts: ProxyOpts) -> Result<Self> {
        let mut p = Self::spawn(opts)?;
        p.wait_ready(Duration::from_secs(10))?;
        Ok(p)
    }

    /// Starts a proxy on free loopback ports without waiting for readiness.
    pub fn spawn(opts: ProxyOpts) -> Result<Self> {
        let outbound = free_addr()?;
        let inbound = free_addr()?;
        let admin = free_addr()?;
        let mut cmd = Command::new(bin("weft-proxy")?);
        cmd.env("WEFT_PROXY_OUTBOUND_ADDR", outbound.to_string())
            .env("WEFT_PROXY_INBOUND_ADDR", inbound.to_string())
            .env("WEFT_PROXY_ADMIN_ADDR", admin.to_string())
            .env(
                "WEFT_PROXY_LOG",
                std::env::var("WEFT_TEST_PROXY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null());
        if let Some(t) = opts.outbound_target {
            cmd.env("WEFT_PROXY_OUTBOUND_FIXED_TARGET", t.to_string());
        }
        if let Some(t) = opts.inbound_target {
            cmd.env("WEFT_PROXY_INBOUND_FIXED_TARGET", t.to_string());
        }
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        if let Some(path) = &opts.stdout {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            cmd.stdout(f);
        }
        let child = cmd.spawn().context("spawning weft-proxy")?;
        Ok(Proxy {
            child,
            outbound,
            inbound,
            admin,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Polls `/ready` until 200; fails when the process exits or the deadline passes.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("weft-proxy exited before becoming ready: {status}");
            }
            if let Ok((200, _)) = admin_get(self.admin, "/ready") {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("weft-proxy not ready within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> Result<Metrics> {
        let (status, body) = admin_get(self.admin, "/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(Metrics::parse(&body))
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Waits for exit up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("weft-proxy did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Open file descriptors of the process, from /proc.
    pub fn open_fds(&self) -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{}/fd", self.pid()))?.count())
    }

    /// Resident memory of the process in bytes, from /proc.
    pub fn rss_bytes(&self) -> Result<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let kb = s
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .context("VmRSS missing")?;
        Ok(kb * 1024)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP/1.0-style GET to the admin port: (status, body).
pub fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    Ok((status, body.to_string()))
}

/// Parsed Prometheus text: sample lines by name with their labels.
#[derive(Debug, Default)]
pub struct Metrics {
    samples: Vec<(String, HashMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = match line.rsplit_once(' ') {
                Some(x) => x,
                None => continue,
            };
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let mut map = HashMap::new();
            // Label values in these tests never contain `",`.
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                if let Some((k, v)) = pair.split_once("=\"") {
                    map.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
            }
            samples.push((name.to_string(), map, value));
        }
        Self { samples }
    }

    /// Sum of samples named `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

/// Polls `f` until it returns Ok(true) or the deadline passes.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while !condition_met(&mut f, &mut last, deadline, timeout)? {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// [`eventually`] for async tests: waits without blocking the runtime's worker.
pub async fn eventually_async(
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while !condition_met(&mut f, &mut last, deadline, timeout)? {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One poll of an `eventually` condition: Ok(true) when met, an error (with the last error
/// `f` returned) once `deadline` has passed, else Ok(false).
fn condition_met(
    f: &mut impl FnMut() -> Result<bool>,
    last: &mut Option<anyhow::Error>,
    deadline: Instant,
    timeout: Duration,
) -> Result<bool> {
    match f() {
        Ok(true) => return Ok(true),
        Ok(false) => {}
        Err(e) => *last = Some(e),
    }
    if Instant::now() > deadline {
        match last.take() {
            Some(e) => bail!("condition not met within {timeout:?}; last error: {e:#}"),
            None => bail!("condition not met within {timeout:?}"),
        }
    }
    Ok(false)
}

/// Whether this process runs as root (netns tests need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For tests that need root: Ok(true) to run, Ok(false) to skip (not root, not CI), Err in CI
/// without root (CI must run them).
pub fn require_root(test: &str) -> Result<bool> {
    if is_root() {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{test} needs root and CI=true: CI must run network-namespace tests as root");
    }
    eprintln!("skipping {test}: needs root (runs in CI)");
    Ok(false)
}
