//! Helpers for the agent's namespace tests, on top of weft-netns-testing (root check,
//! namespaces, probes, shared with cni/plugin/tests/common): the real agent and plugin
//! binaries run in a "node" namespace, host-local IPAM, and the one-way UDP probe.
//!
//! The agent is started with only its *network* namespace switched (`setns` before exec),
//! not with `ip netns exec`: that one also remounts /sys in a private mount namespace, which
//! would hide /sys/fs/bpf, so the pins would die with the process and neither a restart
//! nor this test could see them.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use weft_cni::agent_proto::{AgentClient, Request, Response};
#[allow(unused_imports)] // CNI_BIN_DIR: sources.rs only
pub use weft_netns_testing::{Netns, TcpEcho as TcpServer, CNI_BIN_DIR};

pub const AGENT: &str = env!("CARGO_BIN_EXE_weft-cni-agent");

/// `true` when the test may run: root. Without root it is skipped with a message, or fails
/// when `CI=true`.
pub fn require_root(test: &str) -> bool {
    weft_netns_testing::require_root_and_cni_plugins(test, "network namespaces, eBPF")
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

pub fn unique(tag: &str) -> String {
    weft_netns_testing::unique("wag", tag)
}

/// A node: a namespace standing in for the host, with an address of its own on `lo`.
pub fn node_ns() -> Result<Netns> {
    Netns::node(&["10.250.0.1/32"])
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
    /// The agent on the manifest directory, once its STATUS answers ok.
    pub fn start(node: &Netns, dirs: &AgentDirs) -> Result<Agent> {
        let source = format!("dir:{}", dirs.manifests.display());
        let agent = Agent::spawn(node, dirs, &source, None)?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(agent)
    }

    /// The agent with `--source SOURCE` (and `KUBECONFIG`, for `kube`), as soon as the
    /// process is spawned (the caller checks readiness).
    pub fn spawn(
        node: &Netns,
        dirs: &AgentDirs,
        source: &str,
        kubeconfig: Option<&Path>,
    ) -> Result<Agent> {
        let args: Vec<String> = vec![
            "--source".into(),
            source.into(),
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
        let mut cmd = node.command(AGENT)?;
        cmd.args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(kubeconfig) = kubeconfig {
            cmd.env_remove("KUBERNETES_SERVICE_HOST")
                .env_remove("KUBERNETES_SERVICE_PORT")
                .env("KUBECONFIG", kubeconfig);
        }
        let child = cmd.spawn().context("spawn weft-cni-agent")?;
        Ok(Agent {
            child: Some(child),
            socket: dirs.socket.clone(),
            log: dirs.log.clone(),
            args,
        })
    }

    /// Polls STATUS until `ok`.
    pub fn wait_ready(&self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        let client = AgentClient::new(&self.socket);
        let mut last = String::new();
        while Instant::now() < deadline {
            match client.call(&Request::Status) {
                Ok(Response::Ok | Response::Added { .. }) => return Ok(()),
                Ok(Response::Error { msg }) => last = msg,
                Ok(other) => last = format!("unexpected answer to status: {other:?}"),
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
        if let Some(c) = self.child.take() {
            weft_netns_testing::stop_child(c);
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
        weft_netns_testing::host_local_leases(self.dir.path())
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
    let env = weft_netns_testing::cni_env(command, container_id, netns, pod);
    let stdin = serde_json::to_vec(conf)?;
    let out = weft_netns_testing::exec_cni(node, plugin, env, &stdin, Stdio::inherit())?;
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

/// Starts a TCP echo server ([`TcpServer`]) in `ns` on `ip:port`, until dropped.
pub fn tcp_server(ns: &Netns, ip: IpAddr, port: u16) -> Result<TcpServer> {
    TcpServer::start(&ns.name, SocketAddr::new(ip, port))
}

/// One TCP connection attempt from `from` with an echo: true when it got through.
pub fn tcp_ok(from: &Netns, to: IpAddr, port: u16, timeout: Duration) -> Result<bool> {
    from.run(move || weft_netns_testing::tcp_echo_ok(SocketAddr::new(to, port), timeout))
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
    weft_netns_testing::http_get(&node.name, SocketAddr::new(ip, 9964), path)
}

/// The value of a metric line `name{labels}` (exact prefix) in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Nothing of the agent's is left: no endpoint in its state file or the pinned maps, no policy
/// entry, no link, no recorded source address, no drop or source-drop counter.
pub fn nothing_left(pins: &PinDir, state_dir: &Path) -> Result<()> {
    use weft_datapath::PolicyMaps;
    let dp = weft_datapath::Datapath::open(&pins.0)?;
    ensure!(
        dp.endpoints()?.is_empty(),
        "endpoints left in the map: {:?}",
        dp.endpoints()?
    );
    ensure!(
        dp.policy_entry_counts()? == (0, 0),
        "policy entries left: {:?}",
        dp.policy_entry_counts()?
    );
    ensure!(
        dp.attached()?.is_empty(),
        "links left: {:?}",
        dp.attached()?
    );
    ensure!(
        dp.endpoint_addrs()?.is_empty(),
        "source addresses left: {:?}",
        dp.endpoint_addrs()?
    );
    ensure!(dp.source_drops()?.is_empty(), "source drop counters left");
    ensure!(dp.drops()?.is_empty(), "drop counters left");
    let state: Value = serde_json::from_slice(&std::fs::read(state_dir.join("state.json"))?)?;
    ensure!(
        state["endpoints"].as_object().is_some_and(|e| e.is_empty()),
        "state file entries left: {}",
        state["endpoints"]
    );
    Ok(())
}

/// A pod wired by the real plugin: its namespace, first address, container id and
/// (namespace, name).
pub struct Pod {
    pub ns: Netns,
    pub ip: IpAddr,
    pub cid: String,
    pub key: (&'static str, &'static str),
}

/// ADDs pod `key` (namespace, name) through the plugin in `node`; fails unless ADD succeeds.
pub fn add_pod(
    node: &Netns,
    plugin: &Path,
    conf: &Value,
    key: (&'static str, &'static str),
) -> Result<Pod> {
    let ns = Netns::new(key.1)?;
    let cid = unique(key.1);
    let (code, out) = cni(node, plugin, "ADD", &cid, &ns.path(), key, conf)?;
    ensure!(code == 0, "ADD {key:?} failed: {out}");
    Ok(Pod {
        ip: result_ip(&out)?,
        ns,
        cid,
        key,
    })
}

/// One node with its agent on a manifest directory: the temporary directories, pins, the
/// node namespace, the running agent and the plugin configuration (host-local over `subnet`).
pub struct Node {
    pub tmp: tempfile::TempDir,
    pub manifests: PathBuf,
    pub pins: PinDir,
    pub dirs: AgentDirs,
    pub node: Netns,
    pub agent: Agent,
    pub plugin: PathBuf,
    pub hl: HostLocal,
    pub conf: Value,
}

impl Node {
    /// Writes `files` (name, YAML) into a new manifest directory and starts the agent on it.
    pub fn start(files: &[(&str, &str)], subnet: &str) -> Result<Node> {
        let plugin = workspace_bin("weft-cni", "weft-cni");
        let tmp = tempfile::tempdir()?;
        let manifests = tmp.path().join("manifests");
        std::fs::create_dir(&manifests)?;
        for (name, text) in files {
            write_manifest(&manifests, name, text)?;
        }
        let pins = PinDir::new();
        let dirs = AgentDirs {
            manifests: manifests.clone(),
            pin_dir: pins.0.clone(),
            state_dir: tmp.path().join("state"),
            socket: tmp.path().join("cni.sock"),
            log: tmp.path().join("agent.log"),
        };
        let node = node_ns()?;
        let agent = Agent::start(&node, &dirs)?;
        let hl = HostLocal::new()?;
        let conf = plugin_conf(&dirs.socket, hl.ipam(subnet));
        Ok(Node {
            tmp,
            manifests,
            pins,
            dirs,
            node,
            agent,
            plugin,
            hl,
            conf,
        })
    }

    /// ADDs pod `key` on this node.
    pub fn add_pod(&self, key: (&'static str, &'static str)) -> Result<Pod> {
        add_pod(&self.node, &self.plugin, &self.conf, key)
    }

    /// Replaces manifest `name` atomically.
    pub fn write(&self, name: &str, text: &str) -> Result<()> {
        write_manifest(&self.manifests, name, text)
    }
}

/// Replaces a manifest file atomically (the source never reads half of it).
pub fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// A server in `ns` on `addr` that writes each client's address and closes: what the server
/// side sees (no NAT, or which). Returns the port.
pub fn peer_reporter(ns: &Netns, addr: SocketAddr) -> Result<u16> {
    use std::io::Write;
    let listener = ns.run(move || std::net::TcpListener::bind(addr))??;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            if let Ok(peer) = c.peer_addr() {
                let _ = c.write_all(peer.ip().to_string().as_bytes());
            }
        }
    });
    Ok(port)
}

/// Connects from `from` to a [`peer_reporter`] at `to`: the address the server saw.
pub fn seen_by_server(from: &Netns, to: SocketAddr, timeout: Duration) -> Result<IpAddr> {
    use std::io::Read;
    from.run(move || -> Result<IpAddr> {
        let mut s = std::net::TcpStream::connect_timeout(&to, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        // A server on [::] sees IPv4 clients as ::ffff:a.b.c.d.
        Ok(text.trim().parse::<IpAddr>()?.to_canonical())
    })?
}
