//! Helpers for the agent's namespace tests (adapted from cni/plugin/tests/common): root
//! check, network namespaces, the real agent and plugin binaries run in a "node" namespace,
//! host-local IPAM, and TCP/UDP probes.
//!
//! The agent is started with only its *network* namespace switched (`setns` before exec),
//! not with `ip netns exec`: that one also remounts /sys in a private mount namespace, which
//! would hide /sys/fs/bpf, so the pins would die with the process and neither a restart
//! nor this test could see them.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_cni::agent_proto::{AgentClient, Request, Response};

pub const AGENT: &str = env!("CARGO_BIN_EXE_weft-cni-agent");
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// `true` when the test may run: root. Without root it is skipped with a message, or fails
/// when `CI=true`.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        if !Path::new(CNI_BIN_DIR).join("host-local").exists() {
            panic!("{test}: {CNI_BIN_DIR}/host-local is missing: install containernetworking-plugins (scripts/setup.sh)");
        }
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root (network namespaces, eBPF); CI must run the tests as root");
    }
    eprintln!("skipping {test}: needs root (network namespaces, eBPF)");
    false
}

/// The directory of the workspace's binaries (target/<profile>), from this test's path.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// A workspace binary other than this crate's, built by `cargo build -p <package>`.
pub fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p {package}` before `cargo test -p weft-cni-agent`",
        p.display()
    );
    p
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

pub fn unique(tag: &str) -> String {
    format!(
        "wag-{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = unique(tag);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A node: a namespace standing in for the host, with an address of its own on `lo`.
    pub fn node() -> Result<Netns> {
        let ns = Netns::new("node")?;
        ns.ip(&["addr", "add", "10.250.0.1/32", "dev", "lo"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    pub fn links(&self) -> Result<Vec<String>> {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link", "show"])?)?;
        Ok(v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|l| l["ifname"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(self.path())?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns with an open netns fd changes only this thread.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {}: {}", self.name, std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// A command that runs in this network namespace (and nothing else switched).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let file = File::open(self.path())?;
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (setns) between fork and exec; the fd is
        // kept open by `file`, which the closure owns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A running `weft-cni-agent` in a node namespace; killed on drop (its log printed when the
/// test is failing).
pub struct Agent {
    pub child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
}

pub struct AgentDirs {
    pub manifests: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    pub fn start(node: &Netns, dirs: &AgentDirs) -> Result<Agent> {
        let args: Vec<String> = vec![
            "--source".into(),
            format!("dir:{}", dirs.manifests.display()),
            "--node".into(),
            "test-node".into(),
            "--pin-dir".into(),
            dirs.pin_dir.display().to_string(),
            "--socket".into(),
            dirs.socket.display().to_string(),
            "--metrics-addr".into(),
            "0.0.0.0:9964".into(),
            "--state-dir".into(),
            dirs.state_dir.display().to_string(),
            "--log".into(),
            "info".into(),
        ];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&dirs.log)?;
        let child = node
            .command(AGENT)?
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn weft-cni-agent")?;
        let agent = Agent {
            child: Some(child),
            socket: dirs.socket.clone(),
            log: dirs.log.clone(),
            args,
        };
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// Polls STATUS until `ok`.
    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let client = AgentClient::new(&self.socket);
        let mut last = String::new();
        while Instant::now() < deadline {
            match client.call(&Request::Status) {
                Ok(Response::Ok) => return Ok(()),
                Ok(Response::Error { msg }) => last = msg,
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!(
            "agent not ready within {within:?}: {last}\n--- agent log ---\n{}",
            self.log_text()
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- weft-cni-agent log ---\n{}", self.log_text());
        }
    }
}

/// A pin directory under /sys/fs/bpf, everything unpinned on drop.
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new() -> PinDir {
        PinDir(PathBuf::from("/sys/fs/bpf").join(unique("pins")))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = weft_datapath::unpin_all(&self.0) {
                eprintln!("cleaning up {}: {e}", self.0.display());
            }
        }
    }
}

/// A host-local IPAM section in a temp data dir.
pub struct HostLocal {
    pub dir: tempfile::TempDir,
}

impl HostLocal {
    pub fn new() -> Result<HostLocal> {
        Ok(HostLocal {
            dir: tempfile::tempdir()?,
        })
    }

    pub fn ipam(&self, subnet: &str) -> Value {
        json!({ "type": "host-local", "dataDir": self.dir.path(), "ranges": [[{ "subnet": subnet }]] })
    }

    /// Lease files left (host-local's lock and last-reserved bookkeeping are not leases).
    pub fn leases(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for net in std::fs::read_dir(self.dir.path())? {
            let net = net?;
            for f in std::fs::read_dir(net.path())? {
                let name = f?.file_name().to_string_lossy().into_owned();
                if name != "lock" && !name.starts_with("last_reserved_ip") {
                    out.push(name);
                }
            }
        }
        Ok(out)
    }
}

pub fn plugin_conf(socket: &Path, ipam: Value) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "weft",
        "type": "weft-cni",
        "mtu": 1400,
        "agentSocket": socket,
        "agentTimeoutMs": 5000,
        "ipam": ipam,
    })
}

/// Runs the plugin binary in `node` the way a runtime does (`ip netns exec` is fine for the
/// plugin: it touches no bpffs). Returns (exit code, stdout).
pub fn cni(
    node: &Netns,
    plugin: &Path,
    command: &str,
    container_id: &str,
    netns: &str,
    pod: (&str, &str),
    conf: &Value,
) -> Result<(i32, String)> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.name]).arg(plugin);
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_BIN_DIR)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                pod.0, pod.1
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd.spawn().context("spawn weft-cni")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(&serde_json::to_vec(conf)?)?;
    let out = child.wait_with_output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The first pod address in an ADD result.
pub fn result_ip(result: &str) -> Result<IpAddr> {
    let v: Value = serde_json::from_str(result).context("ADD result is JSON")?;
    v["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in {result}"))
}

/// A TCP server in `ns` on `ip:port` echoing 4 bytes per connection, until dropped.
pub struct TcpServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TcpServer {
    pub fn start(ns: &Netns, ip: IpAddr, port: u16) -> Result<TcpServer> {
        let listener = ns.run(move || TcpListener::bind(SocketAddr::new(ip, port)))??;
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut buf = [0u8; 4];
                        if c.read_exact(&mut buf).is_ok() {
                            let _ = c.write_all(&buf);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(TcpServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One TCP connection attempt from `from` with an echo: true when it got through.
pub fn tcp_ok(from: &Netns, to: IpAddr, port: u16, timeout: Duration) -> Result<bool> {
    from.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&SocketAddr::new(to, port), timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        let mut buf = [0u8; 4];
        s.write_all(b"weft").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"weft"
    })
}

/// One UDP datagram from `from` to `to:port` where `to_ns` listens: true when it arrived.
pub fn udp_ok(
    from: &Netns,
    to_ns: &Netns,
    to: IpAddr,
    port: u16,
    timeout: Duration,
) -> Result<bool> {
    let sock = to_ns.run(move || UdpSocket::bind(SocketAddr::new(to, port)))??;
    sock.set_read_timeout(Some(timeout))?;
    from.run(move || -> Result<()> {
        let s = UdpSocket::bind(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0))?;
        s.send_to(b"weft", SocketAddr::new(to, port))?;
        Ok(())
    })??;
    let mut buf = [0u8; 16];
    Ok(matches!(sock.recv_from(&mut buf), Ok((4, _))))
}

/// GET `path` from the agent's metrics server at `ip`:9964, from inside the node namespace.
pub fn http_get(node: &Netns, ip: IpAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_string();
    node.run(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(ip, 9964), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    })?
}

/// The value of a metric line `name{labels}` (exact prefix) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}
