//! Network-namespace wiring for Weft's root-only tests: the CNI plugin's, the datapath's and
//! the node agent's namespace tests, and `weft-bench netpol`.
//!
//! What every one of them needs and nothing more: the root check ([`require_root`], which
//! fails loudly under `CI=true`), the `ip` runner, a [`Netns`] guard that deletes its
//! namespace on drop, running code inside a namespace on a thread of its own ([`in_ns`],
//! [`Netns::run`]) or a child process ([`Netns::command`]), the pod wiring the datapath tests
//! build by hand ([`router`], [`wire_pod`]: a "node" namespace routing /32 and /128 host
//! routes to pods whose gateways are 169.254.1.1, answered by proxy ARP, and fe80::1), echo
//! servers and TCP/UDP probes, and the cleanup of what a killed run left behind.
//!
//! Several nodes ([`Cluster`]): node namespaces whose `eth0` underlays meet on a bridge in a
//! "fabric" namespace, each with its own pod CIDRs ([`ClusterSpec`] fixes the addressing), a
//! `weft-cni-agent` of its own ([`ClusterNode::spawn_agent`]: its own pin directory, socket,
//! state directory and metrics port, the cluster's Node objects from
//! [`Cluster::nodes_yaml`] in its manifest directory) and pods added by the real `weft-cni`
//! with host-local IPAM over the node's CIDRs ([`ClusterNode::add_pod`]).
//! [`Cluster::static_routes`] joins the pod CIDRs with plain kernel routes instead: the
//! no-eBPF baseline. The cross-node tests (`cni/agent/tests/nodes.rs`), the datapath's
//! differential test and `weft-bench cross-node` build on it:
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use weft_netns_testing::{Cluster, ClusterSpec};
//! let cluster = Cluster::new(ClusterSpec::two_nodes("wrt"))?;
//! let manifests = tempfile_dir_with(&cluster.nodes_yaml());
//! # fn tempfile_dir_with(_: &str) -> std::path::PathBuf { "/tmp/m".into() }
//! let agents: Vec<_> = cluster.nodes.iter()
//!     .map(|n| n.spawn_agent("target/debug/weft-cni-agent".as_ref(), &manifests, &["--routing", "vxlan"]))
//!     .collect::<anyhow::Result<_>>()?;
//! let a = cluster.nodes[0].add_pod("target/debug/weft-cni".as_ref(), ("default", "a"), None)?;
//! let b = cluster.nodes[1].add_pod("target/debug/weft-cni".as_ref(), ("default", "b"), None)?;
//! # Ok(()) }
//! ```
//!
//! Each test crate keeps what only it uses (the fake agent, the eBPF pin directories, the
//! model world) in its own `tests/` support module, on top of this crate.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Where Debian's containernetworking-plugins live (scripts/setup.sh installs them).
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";
/// The pods' IPv4 gateway: answered by proxy ARP on the host veth.
pub const GATEWAY_V4: &str = "169.254.1.1";
/// The pods' IPv6 gateway: an address on every host veth.
pub const GATEWAY_V6: &str = "fe80::1";

/// `true` when the test may run (root). Without root it is skipped with a message naming
/// what it `needs`, or panics when `CI=true`: CI runs the tests as root, and a skip there would
/// hide them.
pub fn require_root(test: &str, needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root ({needs}); CI must run the tests as root");
    }
    eprintln!("skipping {test}: needs root ({needs})");
    false
}

/// [`require_root`], and when root, panics unless the reference plugins (host-local) are
/// installed in [`CNI_BIN_DIR`].
pub fn require_root_and_cni_plugins(test: &str, needs: &str) -> bool {
    if !require_root(test, needs) {
        return false;
    }
    if !Path::new(CNI_BIN_DIR).join("host-local").exists() {
        panic!("{test}: {CNI_BIN_DIR}/host-local is missing: install containernetworking-plugins (scripts/setup.sh)");
    }
    true
}

/// The CNI_* environment of a runtime's call for pod `pod` (namespace, name) in `netns`,
/// interface `eth0`, the reference plugins in [`CNI_BIN_DIR`].
pub fn cni_env(
    command: &str,
    container_id: &str,
    netns: &str,
    pod: (&str, &str),
) -> Vec<(String, String)> {
    [
        ("CNI_COMMAND", command.to_string()),
        ("CNI_CONTAINERID", container_id.to_string()),
        ("CNI_NETNS", netns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", CNI_BIN_DIR.to_string()),
        (
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                pod.0, pod.1
            ),
        ),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into()
}

/// Runs CNI plugin `plugin` in `node` the way a runtime does (`ip netns exec` is fine for a
/// plugin: it touches no bpffs): a process with `stdin` (the conf) on its stdin and `env`
/// (the CNI_* variables) as its only CNI_* environment. Its stdout is captured, its stderr
/// goes to `stderr`.
pub fn exec_cni(
    node: &Netns,
    plugin: impl AsRef<std::ffi::OsStr>,
    env: impl IntoIterator<Item = (String, String)>,
    stdin: &[u8],
    stderr: Stdio,
) -> Result<Output> {
    let plugin = plugin.as_ref();
    let mut cmd = Command::new(ip_bin());
    cmd.args(["netns", "exec", &node.name]).arg(plugin);
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", Path::new(plugin).display()))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(stdin)?;
    Ok(child.wait_with_output()?)
}

fn ip_bin() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip")
}

/// `ip args...` (iproute2); its stdout, or an error with its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new(ip_bin())
        .args(args)
        .output()
        .with_context(|| format!("running ip {} (iproute2)", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `sysctl -q -w settings...` inside namespace `ns` (`/proc/sys/net` follows the network
/// namespace).
pub fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    ip(&args).map(drop)
}

/// Moves the calling thread into network namespace `ns` (a name under /run/netns).
pub fn enter(ns: &str) -> Result<()> {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    // SAFETY: setns on a valid namespace fd; it only changes the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a thread that joined network namespace `ns` and waits for it. Sockets made
/// there stay in `ns` wherever they are used afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            enter(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// `<prefix>-<pid>-<n>-<tag>`: unique in this process, and tells which process made it.
pub fn unique(prefix: &str, tag: &str) -> String {
    format!(
        "{prefix}-{}-{}-{tag}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named network namespace (`ip netns add`, loopback up), deleted on drop with the veth
/// ends in it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A namespace with a [`unique`] name (`wnt-<pid>-<n>-<tag>`).
    pub fn new(tag: &str) -> Result<Netns> {
        Netns::create(unique("wnt", tag))
    }

    /// A namespace with a fixed name; one a killed earlier run left behind is removed first.
    pub fn named(name: String) -> Result<Netns> {
        let _ = ip(&["netns", "del", &name]);
        Netns::create(name)
    }

    fn create(name: String) -> Result<Netns> {
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A node: a [`Netns::new`] standing in for the host, with `addrs` (CIDRs) of its own on
    /// `lo` to talk to pods from.
    pub fn node(addrs: &[&str]) -> Result<Netns> {
        let ns = Netns::new("node")?;
        for a in addrs {
            if a.contains(':') {
                ns.ip(&["-6", "addr", "add", a, "dev", "lo"])?;
            } else {
                ns.ip(&["addr", "add", a, "dev", "lo"])?;
            }
        }
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n <ns> args...`, stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// `sysctl -w` inside this namespace.
    pub fn sysctl(&self, settings: &[&str]) -> Result<()> {
        sysctl(&self.name, settings)
    }

    /// Interface names in this namespace.
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

    /// The index of link `name`.
    pub fn ifindex(&self, name: &str) -> Result<u32> {
        let v: Value = serde_json::from_str(&self.ip(&["-j", "link", "show", "dev", name])?)?;
        v[0]["ifindex"]
            .as_u64()
            .map(|i| i as u32)
            .context("no ifindex")
    }

    /// All routes (both families, main table) as `ip` prints them.
    pub fn routes(&self) -> Result<String> {
        Ok(format!(
            "{}{}",
            self.ip(&["route", "show"])?,
            self.ip(&["-6", "route", "show"])?
        ))
    }

    /// Runs `f` on a thread inside this namespace and waits for it.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_ns(&self.name, f)
    }

    /// A command that runs in this network namespace, nothing else switched. (`ip netns
    /// exec` also remounts /sys in a private mount namespace, which hides /sys/fs/bpf.)
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let file = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        let mut cmd = Command::new(program);
        // SAFETY: one async-signal-safe call (setns) between fork and exec; `file` is owned
        // by the closure and stays open until exec.
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
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            // Silent when a test deleted it already.
            if Path::new(&self.path()).exists() {
                eprintln!("cleaning up: {e}");
            }
        }
    }
}

/// Turns the (existing) namespace `ns` into the node pods hang off: forwarding on, no DAD,
/// and a route for 169.254.1.1 out of `lo` so that proxy ARP answers for it on the host
/// veths (proxy ARP answers for addresses routed out of another interface; on a real host
/// the default route does that).
pub fn router(ns: &str) -> Result<()> {
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    sysctl(
        ns,
        &[
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ],
    )?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &format!("{GATEWAY_V4}/32"),
        "dev",
        "lo",
    ])?;
    Ok(())
}

/// A pod to wire into a [`router`] node.
#[derive(Clone, Debug)]
pub struct PodLink<'a> {
    pub node: &'a str,
    /// The pod's namespace; it must exist.
    pub pod: &'a str,
    /// The host-side veth's name (the pod side is `eth0`).
    pub host_if: &'a str,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    /// The node's source addresses for its routes to the pod, if any.
    pub src_v4: Option<Ipv4Addr>,
    pub src_v6: Option<Ipv6Addr>,
}

/// Wires a pod: a veth pair `host_if` / `eth0`, proxy ARP (without delay) and fe80::1 on
/// the host side with /32 and /128 routes to the pod, the pod's addresses on `eth0` and
/// default routes via 169.254.1.1 and fe80::1.
pub fn wire_pod(p: &PodLink<'_>) -> Result<()> {
    let (ns, pod_ns, host_if) = (p.node, p.pod, p.host_if);
    ip(&["-n", pod_ns, "link", "set", "lo", "up"])?;
    sysctl(
        pod_ns,
        &[
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ],
    )?;
    ip(&[
        "-n", ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns,
    ])?;
    sysctl(
        ns,
        &[
            &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
            // Answer at once (the default delays proxy answers by up to 0.8 s).
            &format!("net.ipv4.neigh.{host_if}.proxy_delay=0"),
        ],
    )?;
    let gw6 = format!("{GATEWAY_V6}/64");
    ip(&["-n", ns, "-6", "addr", "add", &gw6, "dev", host_if, "nodad"])?;
    ip(&["-n", ns, "link", "set", host_if, "up"])?;
    let v4 = format!("{}/32", p.v4);
    let src = p.src_v4.map(|a| a.to_string());
    let mut route = vec!["-n", ns, "route", "add", &v4, "dev", host_if];
    if let Some(src) = &src {
        route.extend(["src", src]);
    }
    ip(&route)?;
    ip(&["-n", pod_ns, "addr", "add", &v4, "dev", "eth0"])?;
    if let Some(v6) = p.v6 {
        let v6 = format!("{v6}/128");
        let src = p.src_v6.map(|a| a.to_string());
        let mut route = vec!["-n", ns, "-6", "route", "add", &v6, "dev", host_if];
        if let Some(src) = &src {
            route.extend(["src", src]);
        }
        ip(&route)?;
        ip(&[
            "-n", pod_ns, "-6", "addr", "add", &v6, "dev", "eth0", "nodad",
        ])?;
    }
    ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n", pod_ns, "route", "add", GATEWAY_V4, "dev", "eth0", "scope", "link",
    ])?;
    ip(&[
        "-n", pod_ns, "route", "add", "default", "via", GATEWAY_V4, "dev", "eth0",
    ])?;
    if p.v6.is_some() {
        ip(&[
            "-n", pod_ns, "-6", "route", "add", "default", "via", GATEWAY_V6, "dev", "eth0",
        ])?;
    }
    Ok(())
}

/// Deletes namespaces named `<prefix><pid>-...` and directories `<pin_parent>/<pin_prefix><pid>`
/// (after `clean` ran on them) of processes that no longer exist: what a killed run left.
pub fn remove_stale(prefix: &str, pin_parent: &Path, pin_prefix: &str, clean: impl Fn(&Path)) {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(prefix) else {
                continue;
            };
            let Some((pid, _)) = rest.split_once('-') else {
                continue;
            };
            if pid.chars().all(|c| c.is_ascii_digit()) && !alive(pid) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(pin_parent) {
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(pin_prefix)) else {
                continue;
            };
            if !alive(pid) {
                clean(&entry.path());
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

/// The line [`echo`] sends.
pub const PING: &[u8] = b"ping\n";

/// Writes [`PING`] and expects it echoed back within `timeout`.
pub fn echo(s: &mut TcpStream, timeout: Duration) -> bool {
    let _ = s.set_read_timeout(Some(timeout));
    let mut buf = [0u8; 5];
    s.write_all(PING).is_ok() && s.read_exact(&mut buf).is_ok() && &buf[..] == PING
}

/// One TCP connection to `to` with an [`echo`], from this thread's namespace: whether it got
/// through within `timeout` (a connect timeout means dropped).
pub fn tcp_echo_ok(to: SocketAddr, timeout: Duration) -> bool {
    match TcpStream::connect_timeout(&to, timeout) {
        Ok(mut s) => echo(&mut s, timeout),
        Err(_) => false,
    }
}

/// One UDP datagram from a socket bound to `bind` to `to` (a [`UdpEcho`]), from this
/// thread's namespace: whether it came back from `to` within `timeout`. Errors making the
/// socket or sending are errors, not drops.
pub fn udp_echo_ok(bind: SocketAddr, to: SocketAddr, timeout: Duration) -> std::io::Result<bool> {
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.send_to(b"ping", to)?;
    let mut buf = [0u8; 16];
    Ok(matches!(sock.recv_from(&mut buf), Ok((4, from)) if from == to && &buf[..4] == b"ping"))
}

/// A server thread stopped and joined on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP echo server on `addr` in a namespace (`[::]` serves both families), a thread per
/// connection echoing until EOF or 5 s idle; stopped on drop.
pub struct TcpEcho {
    port: u16,
    _server: Server,
}

impl TcpEcho {
    pub fn start(ns: &str, addr: SocketAddr) -> Result<TcpEcho> {
        let listener = in_ns(ns, || TcpListener::bind(addr))?
            .with_context(|| format!("listening on TCP {addr} in {ns}"))?;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = conn.read(&mut buf) {
                                if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(TcpEcho {
            port,
            _server: Server {
                stop,
                thread: Some(thread),
            },
        })
    }

    /// The port it listens on (for an `addr` with port 0).
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A UDP echo server on `addr` in a namespace; stopped on drop.
pub struct UdpEcho {
    _server: Server,
}

impl UdpEcho {
    pub fn start(ns: &str, addr: SocketAddr) -> Result<UdpEcho> {
        let sock = in_ns(ns, || UdpSocket::bind(addr))?
            .with_context(|| format!("binding UDP {addr} in {ns}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        Ok(UdpEcho {
            _server: Server {
                stop,
                thread: Some(thread),
            },
        })
    }
}

/// `GET path` over HTTP/1.0 to `addr` from inside `ns`: the status code and the body.
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    in_ns(ns, || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
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

/// Stops a child: SIGTERM, SIGKILL if it still runs after 5 s, and reaps it.
pub fn stop_child(mut c: Child) {
    if let Ok(pid) = i32::try_from(c.id()) {
        // SAFETY: kill on our own, not yet reaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
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

/// Lease files host-local left in its data dir `dir` (its lock and last-reserved
/// bookkeeping are not leases).
pub fn host_local_leases(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for net in std::fs::read_dir(dir)? {
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

// ---------------------------------------------------------------------------------------
// Several nodes: the world of the cross-node tests (agent routing, Services, the
// differential test's two-node case, `weft-bench cross-node`).
// ---------------------------------------------------------------------------------------

/// What a [`Cluster`] looks like. Addresses are fixed per cluster (each cluster has a fabric
/// namespace of its own, so two clusters never share a wire); names and pin directories
/// carry `prefix`, which the caller keeps to itself so that concurrent tests do not collide.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Namespace and pin directory prefix (`<prefix>-<pid>-<n>-<tag>`), e.g. `wrt`.
    pub prefix: String,
    /// Number of nodes (1..=200).
    pub nodes: usize,
    /// IPv6 on the underlay and an IPv6 pod CIDR per node as well.
    pub dual_stack: bool,
    /// The MTU of the underlay links (both veth ends and the bridge).
    pub underlay_mtu: u32,
}

impl ClusterSpec {
    /// Two IPv4 nodes on a 1500-byte underlay.
    pub fn two_nodes(prefix: &str) -> ClusterSpec {
        ClusterSpec {
            prefix: prefix.to_string(),
            nodes: 2,
            dual_stack: false,
            underlay_mtu: 1500,
        }
    }
}

/// Nodes as network namespaces joined by an underlay: each node's `eth0` is a veth whose
/// other end sits on bridge `br0` in a "fabric" namespace (the switch between the hosts).
/// Node `i` (from 1) has the underlay addresses `192.168.77.<10+i>/24` and
/// `fd00:77::<10+i>/64`, pod CIDRs `10.77.<i>.0/24` and `fd77:0:<i>::/64`, and is a
/// [`router`] (forwarding on, proxy ARP for the pods' gateway). Nothing routes between the
/// nodes' pod CIDRs until someone installs routes: the agent under test
/// ([`ClusterNode::spawn_agent`]) or [`Cluster::static_routes`] (the baseline without eBPF).
///
/// Everything is removed on drop: the namespaces (pods first, then nodes, then the fabric),
/// the agents (stopped), each node's pin directory and scratch directory.
pub struct Cluster {
    pub spec: ClusterSpec,
    /// Dropped after the nodes (field order).
    pub nodes: Vec<ClusterNode>,
    pub fabric: Netns,
}

/// One node of a [`Cluster`].
pub struct ClusterNode {
    /// The Node object's name: `node-<i>`.
    pub name: String,
    pub ns: Netns,
    pub underlay_v4: Ipv4Addr,
    pub underlay_v6: Option<Ipv6Addr>,
    /// `10.77.<i>.0/24`.
    pub pod_cidr_v4: String,
    /// `fd77:0:<i>::/64` when dual stack.
    pub pod_cidr_v6: Option<String>,
    /// Scratch: the agent's socket, state directory and log, host-local's data.
    pub dir: std::path::PathBuf,
    /// This node's agent's bpffs pin directory (under /sys/fs/bpf), removed on drop.
    pub pin_dir: std::path::PathBuf,
}

impl Cluster {
    /// Builds the fabric and the nodes (needs root).
    pub fn new(spec: ClusterSpec) -> Result<Cluster> {
        anyhow::ensure!(
            (1..=200).contains(&spec.nodes),
            "a cluster has 1 to 200 nodes, not {}",
            spec.nodes
        );
        let fabric = Netns::named(unique(&spec.prefix, "fabric"))?;
        let mtu = spec.underlay_mtu.to_string();
        fabric.ip(&["link", "add", "br0", "mtu", &mtu, "type", "bridge"])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Cluster {
            spec: spec.clone(),
            nodes: Vec::new(),
            fabric,
        };
        for i in 1..=spec.nodes {
            let node = cluster.add_node(i)?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    fn add_node(&self, i: usize) -> Result<ClusterNode> {
        let spec = &self.spec;
        let ns = Netns::named(unique(&spec.prefix, &format!("n{i}")))?;
        router(&ns.name)?;
        let mtu = spec.underlay_mtu.to_string();
        let port = format!("u{i}");
        self.fabric.ip(&[
            "link", "add", &port, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "netns",
            &ns.name,
        ])?;
        self.fabric
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        let host = 10 + i;
        let underlay_v4 = Ipv4Addr::new(192, 168, 77, host as u8);
        ns.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
        ns.ip(&["addr", "add", &format!("{underlay_v4}/24"), "dev", "eth0"])?;
        let underlay_v6 = if spec.dual_stack {
            let a: Ipv6Addr = format!("fd00:77::{host:x}").parse()?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            Some(a)
        } else {
            None
        };
        let dir = std::env::temp_dir().join(unique(&spec.prefix, &format!("n{i}-dir")));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ClusterNode {
            name: format!("node-{i}"),
            pin_dir: Path::new("/sys/fs/bpf").join(unique(&spec.prefix, &format!("n{i}-pins"))),
            ns,
            underlay_v4,
            underlay_v6,
            pod_cidr_v4: format!("10.77.{i}.0/24"),
            pod_cidr_v6: spec.dual_stack.then(|| format!("fd77:0:{i:x}::/64")),
            dir,
        })
    }

    /// The cluster's Node objects as manifests (`spec.podCIDRs`, `status.addresses` with
    /// the InternalIPs), for an agent's `--source dir:`.
    pub fn nodes_yaml(&self) -> String {
        self.nodes
            .iter()
            .map(ClusterNode::node_yaml)
            .collect::<Vec<_>>()
            .join("---\n")
    }

    /// Plain kernel routes from every node to every other node's pod CIDRs via its
    /// underlay address: direct routing with no agent and no eBPF (the baseline).
    pub fn static_routes(&self) -> Result<()> {
        for a in &self.nodes {
            for b in self.nodes.iter().filter(|b| b.name != a.name) {
                a.ns.ip(&[
                    "route",
                    "replace",
                    &b.pod_cidr_v4,
                    "via",
                    &b.underlay_v4.to_string(),
                ])?;
                if let (Some(c), Some(via)) = (&b.pod_cidr_v6, b.underlay_v6) {
                    a.ns.ip(&["-6", "route", "replace", c, "via", &via.to_string()])?;
                }
            }
        }
        Ok(())
    }

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&ClusterNode> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

impl ClusterNode {
    /// This node's Node object.
    pub fn node_yaml(&self) -> String {
        let mut cidrs = vec![self.pod_cidr_v4.clone()];
        cidrs.extend(self.pod_cidr_v6.clone());
        let mut addrs = vec![format!(
            "{{type: InternalIP, address: \"{}\"}}",
            self.underlay_v4
        )];
        if let Some(v6) = self.underlay_v6 {
            addrs.push(format!("{{type: InternalIP, address: \"{v6}\"}}"));
        }
        addrs.push(format!("{{type: Hostname, address: {}}}", self.name));
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDRs: [{}]}}\nstatus: {{addresses: [{}]}}\n",
            self.name,
            cidrs.join(", "),
            addrs.join(", ")
        )
    }

    /// The agent's plugin socket on this node.
    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.join("cni.sock")
    }

    /// The agent's log file.
    pub fn agent_log(&self) -> std::path::PathBuf {
        self.dir.join("agent.log")
    }

    /// The flags that make an agent this node's: `--node`, `--pin-dir`, `--socket`,
    /// `--state-dir`, `--metrics-addr` (`0.0.0.0:9964` inside the node's namespace),
    /// `--source dir:<manifests>`, `--log`.
    pub fn agent_args(&self, manifests: &Path) -> Vec<String> {
        [
            "--source",
            &format!("dir:{}", manifests.display()),
            "--node",
            &self.name,
            "--pin-dir",
            &self.pin_dir.display().to_string(),
            "--socket",
            &self.socket().display().to_string(),
            "--state-dir",
            &self.dir.join("state").display().to_string(),
            "--metrics-addr",
            "0.0.0.0:9964",
            "--log",
            "info",
        ]
        .map(str::to_string)
        .into()
    }

    /// Starts `agent` (the `weft-cni-agent` binary) in this node's namespace with
    /// [`ClusterNode::agent_args`] plus `extra`, entered with `setns` only (so its pins stay on
    /// the host's bpffs), its output appended to [`ClusterNode::agent_log`]; waits until its
    /// `/ready` answers 200 (at most 20 s).
    pub fn spawn_agent(&self, agent: &Path, manifests: &Path, extra: &[&str]) -> Result<NodeAgent> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())?;
        let mut cmd = self.ns.command(agent)?;
        cmd.args(self.agent_args(manifests))
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", agent.display()))?;
        let agent = NodeAgent {
            child: Some(child),
            log: self.agent_log(),
            node: self.name.clone(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let ready = SocketAddr::from(([127, 0, 0, 1], 9964));
        loop {
            if let Ok((200, _)) = http_get(&self.ns.name, ready, "/ready") {
                if self.socket().exists() {
                    return Ok(agent);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent of {} is not ready after 20 s\n--- log ---\n{}",
                    self.name,
                    agent.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The `weft-cni` network configuration for this node: host-local IPAM over its pod
    /// CIDRs (data in its scratch directory), its agent's socket; `extra` fields (e.g.
    /// `mtu`) are merged in.
    pub fn cni_conf(&self, extra: Option<&Value>) -> Value {
        let mut ranges = vec![serde_json::json!([{ "subnet": self.pod_cidr_v4 }])];
        if let Some(v6) = &self.pod_cidr_v6 {
            ranges.push(serde_json::json!([{ "subnet": v6 }]));
        }
        let mut conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "weft",
            "type": "weft-cni",
            "agentSocket": self.socket(),
            "agentTimeoutMs": 5000,
            "ipam": {"type": "host-local", "dataDir": self.dir.join("ipam"), "ranges": ranges},
        });
        if let (Some(obj), Some(Value::Object(extra))) = (conf.as_object_mut(), extra) {
            for (k, v) in extra {
                obj.insert(k.clone(), v.clone());
            }
        }
        conf
    }

    /// The IPAM section of [`ClusterNode::cni_conf`] with host-local's ranges written as
    /// `"subnet": "usePodCidr"` (and a `"usePodCidrIPv6"` range set in a dual-stack cluster)
    /// instead of this node's CIDRs: the plugin asks the node's agent for them, which reads
    /// them from the Node objects ([`Cluster::nodes_yaml`]). Same data directory.
    pub fn use_pod_cidr_ipam(&self) -> Value {
        let mut ranges = vec![serde_json::json!([{ "subnet": "usePodCidr" }])];
        if self.pod_cidr_v6.is_some() {
            ranges.push(serde_json::json!([{ "subnet": "usePodCidrIPv6" }]));
        }
        serde_json::json!({"type": "host-local", "dataDir": self.dir.join("ipam"), "ranges": ranges})
    }

    /// `{"ipam": <use_pod_cidr_ipam>}`: the `extra` for [`ClusterNode::add_pod`] (and
    /// [`ClusterNode::cni_conf`]) that gives a pod its addresses from the node's pod CIDRs
    /// through the agent.
    pub fn use_pod_cidr(&self) -> Value {
        serde_json::json!({ "ipam": self.use_pod_cidr_ipam() })
    }

    /// A pod `namespace/name` on this node: a new network namespace wired by `plugin` (the
    /// `weft-cni` binary) with [`ClusterNode::cni_conf`]`(extra)`, as a runtime's ADD does.
    pub fn add_pod(
        &self,
        plugin: &Path,
        pod: (&str, &str),
        extra: Option<&Value>,
    ) -> Result<ClusterPod> {
        let ns = Netns::named(unique(&self.ns.name, pod.1))?;
        let container_id = format!("c-{}", ns.name);
        let conf = self.cni_conf(extra);
        let out = exec_cni(
            &self.ns,
            plugin,
            cni_env("ADD", &container_id, &ns.path(), pod),
            &serde_json::to_vec(&conf)?,
            Stdio::inherit(),
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("ADD {}/{} on {}: {stdout}", pod.0, pod.1, self.name);
        }
        let result: Value = serde_json::from_str(&stdout).context("ADD result is JSON")?;
        let mut v4 = None;
        let mut v6 = None;
        for ip in result["ips"].as_array().into_iter().flatten() {
            match ip["address"]
                .as_str()
                .and_then(|a| a.split('/').next())
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            {
                Some(std::net::IpAddr::V4(a)) => v4 = Some(a),
                Some(std::net::IpAddr::V6(a)) => v6 = Some(a),
                None => {}
            }
        }
        Ok(ClusterPod {
            v4: v4.with_context(|| format!("no IPv4 address in {stdout}"))?,
            v6,
            container_id,
            namespace: pod.0.to_string(),
            name: pod.1.to_string(),
            node: self.name.clone(),
            result,
            ns,
        })
    }

    /// DEL of `pod` through `plugin` (the pod's namespace stays until the pod is dropped).
    pub fn del_pod(&self, plugin: &Path, pod: &ClusterPod) -> Result<()> {
        let out = exec_cni(
            &self.ns,
            plugin,
            cni_env(
                "DEL",
                &pod.container_id,
                &pod.ns.path(),
                (&pod.namespace, &pod.name),
            ),
            &serde_json::to_vec(&self.cni_conf(None))?,
            Stdio::inherit(),
        )?;
        if !out.status.success() {
            bail!(
                "DEL {}/{}: {}",
                pod.namespace,
                pod.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(())
    }

    /// The MTU of link `ifname` in namespace `ns`.
    pub fn mtu_of(ns: &Netns, ifname: &str) -> Result<u32> {
        let v: Value = serde_json::from_str(&ns.ip(&["-j", "link", "show", "dev", ifname])?)?;
        v[0]["mtu"]
            .as_u64()
            .map(|m| m as u32)
            .with_context(|| format!("no mtu for {ifname} in {}", ns.name))
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if self.pin_dir.exists() {
            // Unlinking the pins (maps, programs, tcx links) releases what no process holds.
            if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
                eprintln!("cleaning up {}: {e}", self.pin_dir.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A pod a [`ClusterNode::add_pod`] wired; its namespace goes on drop (the agent collects the
/// endpoint whose interface vanished).
pub struct ClusterPod {
    pub ns: Netns,
    pub namespace: String,
    pub name: String,
    /// The node it runs on.
    pub node: String,
    pub container_id: String,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    /// The plugin's ADD result.
    pub result: Value,
}

/// A `weft-cni-agent` a [`ClusterNode::spawn_agent`] started: stopped on drop, its log printed
/// when the test is failing.
pub struct NodeAgent {
    pub child: Option<Child>,
    pub log: std::path::PathBuf,
    pub node: String,
}

impl NodeAgent {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait (SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            stop_child(c);
        }
    }
}

impl Drop for NodeAgent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "--- weft-cni-agent log ({}) ---\n{}",
                self.node,
                self.log_text()
            );
        }
    }
}
