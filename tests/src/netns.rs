//! Pods as Linux network namespaces, for the root-only tier (`tests/tests/netns_*.rs`).
//!
//! [`Net::new`] builds one namespace per pod plus one holding a bridge; each pod gets an `eth0`
//! veth whose peer is a bridge port, an IPv4 address in `10.251.0.0/24` and an IPv6 address in
//! `fd00:251::/64` (`nodad`, so it is usable at once). Nothing is created in, or routed to, the
//! host's own namespace: every address a test touches lives in namespaces the test made.
//!
//! Names are `wt<pid>-<n>-<i>` (at most 15 characters, like interface names), unique per test
//! process and per test. Dropping the [`Net`] kills every process still inside its namespaces
//! and deletes them, also when the test panics; a later run removes namespaces left behind by a
//! test process that no longer exists (killed with SIGKILL, say).
//!
//! Processes started with [`Pod::spawn`] run in their own process group, log to a file, and are
//! killed with their group on drop. Code that must open sockets inside a pod (probes, metrics
//! scrapes, small servers) runs on a thread that has joined the pod's namespace ([`Pod::run`]).

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{admin_get, eventually, Metrics};

/// The UID the proxy runs as; iptables rules skip it so the proxy's own traffic is not redirected.
pub const PROXY_UID: u32 = 2102;
/// The proxy's default listener ports (DESIGN.md).
pub const OUTBOUND_PORT: u16 = 4140;
pub const INBOUND_PORT: u16 = 4143;
pub const ADMIN_PORT: u16 = 4191;

const NETNS_DIR: &str = "/run/netns";
static NEXT_NET: AtomicUsize = AtomicUsize::new(0);

/// `iptables` / `ip6tables` with the nftables backend (Debian's default; named explicitly so a
/// host whose alternatives point at the legacy backend still gets nft rules).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables-nft",
            Family::V6 => "ip6tables-nft",
        }
    }
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }
}

/// A set of pods joined by a bridge. Deletes everything it made on drop.
pub struct Net {
    prefix: String,
    bridge_ns: String,
    pods: Vec<Pod>,
    dir: PathBuf,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("prefix", &self.prefix)
            .field("pods", &self.pods)
            .finish()
    }
}

/// One pod: a network namespace with `eth0` on the bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The name the test gave it ("cli", "srv").
    pub name: String,
    /// The network namespace (`ip netns` name).
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    dir: PathBuf,
}

impl Net {
    /// Creates the bridge namespace and one namespace per pod name, pod `i` at `10.251.0.(i+1)`
    /// and `fd00:251::(i+1)`.
    pub fn new(pods: &[&str]) -> Result<Net> {
        if pods.is_empty() || pods.len() > 9 {
            bail!("a Net holds 1 to 9 pods, not {}", pods.len());
        }
        remove_stale_namespaces();
        let n = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("wt{}-{n}", std::process::id());
        if prefix.len() + 2 > 15 {
            bail!("namespace prefix {prefix:?} too long for 15-character names");
        }
        let dir = std::env::temp_dir().join(format!("weft-e2e-{prefix}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut net = Net {
            bridge_ns: format!("{prefix}-b"),
            prefix,
            pods: Vec::new(),
            dir,
        };
        // From here on, Drop cleans up whatever was made, also if a later step fails.
        let b = net.bridge_ns.clone();
        ip(&["netns", "add", &b])?;
        ip(&["-n", &b, "link", "set", "lo", "up"])?;
        ip(&["-n", &b, "link", "add", "br0", "type", "bridge"])?;
        // No snooping: without an MLD querier it only delays IPv6 neighbour discovery.
        ip(&[
            "-n",
            &b,
            "link",
            "set",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", &b, "link", "set", "br0", "up"])?;
        for (i, name) in pods.iter().enumerate() {
            let ns = format!("{}-{i}", net.prefix);
            ip(&["netns", "add", &ns])?;
            let pod = Pod {
                name: name.to_string(),
                ns: ns.clone(),
                v4: Ipv4Addr::new(10, 251, 0, i as u8 + 1),
                v6: Ipv6Addr::new(0xfd00, 0x251, 0, 0, 0, 0, 0, i as u16 + 1),
                dir: net.dir.clone(),
            };
            net.pods.push(pod.clone());
            let port = format!("p{i}");
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &b, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &b, "link", "set", &port, "master", "br0", "up"])?;
            let v4 = format!("{}/24", pod.v4);
            let v6 = format!("{}/64", pod.v6);
            ip(&["-n", &ns, "addr", "add", &v4, "dev", "eth0"])?;
            ip(&["-n", &ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    /// The pod the test named `name`.
    pub fn pod(&self, name: &str) -> &Pod {
        match self.pods.iter().find(|p| p.name == name) {
            Some(p) => p,
            None => panic!("no pod named {name:?} in {self:?}"),
        }
    }

    /// A scratch directory for this net (process logs, files to serve); removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Prints every process log of this net to stderr (call when a test fails).
    pub fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            eprintln!("----- {} -----\n{}", p.display(), tail(&text, 6000));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let mut all: Vec<&str> = self.pods.iter().map(|p| p.ns.as_str()).collect();
        all.push(&self.bridge_ns);
        for ns in all {
            kill_namespace_processes(ns);
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `body` on a fresh [`Net`] of `pods`; on failure prints the processes' logs and each
/// pod's nat table first, then deletes everything.
pub fn with_net(pods: &[&str], body: impl FnOnce(&Net) -> Result<()>) -> Result<()> {
    let net = Net::new(pods)?;
    let result = body(&net);
    if result.is_err() {
        net.dump_logs();
        for p in pods {
            eprintln!(
                "----- nat rules in pod {p} -----\n{}",
                net.pod(p).nat_rules()
            );
        }
    }
    result
}

/// `python3 -m http.server` in a pod, dual-stack on `port`, serving `/hello.txt`.
pub struct HelloServer {
    _process: Process,
    /// The body of `/hello.txt`, unique to the pod.
    pub body: String,
}

impl HelloServer {
    /// Starts the server (its own process, as an unmodified app) and waits until it listens on
    /// the pod's IPv4 and IPv6 addresses.
    pub fn start(net: &Net, pod: &Pod, port: u16) -> Result<Self> {
        let root = net.dir().join(format!("www-{}", pod.name));
        std::fs::create_dir_all(&root)?;
        let body = format!("hello from pod {} ({})\n", pod.name, pod.ns);
        std::fs::write(root.join("hello.txt"), &body)?;
        let mut cmd = pod.command("python3");
        // `--bind ::` listens dual-stack (IPV6_V6ONLY off): one process serves both families.
        cmd.args(["-m", "http.server", "--bind", "::", "--directory"])
            .arg(&root)
            .arg(port.to_string());
        let mut process = pod.spawn("http-server", cmd)?;
        for addr in [pod.v4_addr(port), pod.v6_addr(port)] {
            if let Err(e) = pod.wait_listening(addr, Duration::from_secs(10)) {
                process.check_running()?;
                return Err(e);
            }
        }
        Ok(Self {
            _process: process,
            body,
        })
    }

    /// The URL `curl` fetches (`http://[v6]:port/hello.txt` for IPv6).
    pub fn url(addr: SocketAddr) -> String {
        format!("http://{addr}/hello.txt")
    }
}

impl Pod {
    /// The pod's IPv4 address with `port`.
    pub fn v4_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.v4, port))
    }

    /// The pod's IPv6 address with `port`.
    pub fn v6_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.v6, port))
    }

    /// `ip netns exec <ns> <program>`, ready for arguments.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        // Nothing from the developer's shell changes how curl or the proxy behave here.
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy();
            if k.starts_with("WEFT_PROXY_") || k.to_ascii_lowercase().ends_with("_proxy") {
                c.env_remove(&*k);
            }
        }
        c.stdin(Stdio::null());
        c
    }

    /// Runs a command in the pod to completion; its stdout, or an error with its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.ns))?;
        if !out.status.success() {
            bail!(
                "`{program} {}` in pod {} ({}) failed ({}): {}",
                args.join(" "),
                self.name,
                self.ns,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts a long-running process in the pod, logging to `<name>.log` in the net's directory.
    pub fn spawn(&self, name: &str, mut cmd: Command) -> Result<Process> {
        let log = self.dir.join(format!("{}-{name}.log", self.name));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(out.try_clone()?).stderr(out).process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name} in {}", self.ns))?;
        Ok(Process {
            name: format!("{name} in pod {}", self.name),
            child,
            log,
        })
    }

    /// Runs `f` on a thread inside the pod's network namespace: sockets it opens belong to the pod.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter_namespace(&self.ns)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| bail!("thread in {} panicked", self.ns))
        })
    }

    /// Whether a TCP connection to `addr`, made from inside the pod, is accepted.
    pub fn can_connect(&self, addr: SocketAddr) -> bool {
        self.run(|| Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(1))?))
            .is_ok()
    }

    /// Waits until something inside the pod (or reachable from it) accepts on `addr`.
    pub fn wait_listening(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        eventually(timeout, || Ok(self.can_connect(addr)))
            .with_context(|| format!("nothing listening on {addr} (seen from pod {})", self.name))
    }

    /// Sends `payload` over TCP from inside the pod, half-closes, and returns what came back.
    pub fn tcp_exchange(&self, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
        self.run(|| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to {addr}"))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(payload)?;
            s.shutdown(std::net::Shutdown::Write)?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)
                .with_context(|| format!("reading the reply from {addr}"))?;
            Ok(out)
        })
    }

    /// Unmodified curl inside the pod: (status code, body). Fails only if curl itself fails.
    pub fn curl(&self, url: &str) -> Result<(u16, String)> {
        const MARK: &str = "\n--weft-status:";
        let out = self.exec(
            "curl",
            &[
                "--silent",
                "--show-error",
                "--globoff",
                "--noproxy",
                "*",
                "--max-time",
                "10",
                "--write-out",
                &format!("{MARK}%{{http_code}}"),
                url,
            ],
        )?;
        let (body, code) = out
            .rsplit_once(MARK)
            .with_context(|| format!("no status in curl output: {out:?}"))?;
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// Appends iptables (nft) rules in the nat table sending the pod's outgoing TCP to
    /// `to_port`, except traffic of `skip_uid` (the proxy) and to loopback.
    pub fn redirect_outbound(&self, family: Family, skip_uid: u32, to_port: u16) -> Result<()> {
        let (uid, port) = (skip_uid.to_string(), to_port.to_string());
        let t = family.iptables();
        #[rustfmt::skip]
        let rules: [&[&str]; 3] = [
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"],
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", family.loopback(), "-j", "RETURN"],
            &["-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-j", "REDIRECT", "--to-ports", &port],
        ];
        for r in rules {
            self.exec(t, r)?;
        }
        Ok(())
    }

    /// Appends an iptables (nft) rule in the nat table sending TCP arriving for `dport` to
    /// `to_port`.
    pub fn redirect_inbound(&self, family: Family, dport: u16, to_port: u16) -> Result<()> {
        let (dport, port) = (dport.to_string(), to_port.to_string());
        #[rustfmt::skip]
        let rule = [
            "-t", "nat", "-A", "PREROUTING", "-p", "tcp", "--dport", &dport, "-j", "REDIRECT",
            "--to-ports", &port,
        ];
        self.exec(family.iptables(), &rule)?;
        Ok(())
    }

    /// The pod's nat table, for failure messages.
    pub fn nat_rules(&self) -> String {
        [Family::V4, Family::V6]
            .iter()
            .map(|f| {
                self.exec(f.iptables(), &["-t", "nat", "-S"])
                    .unwrap_or_else(|e| format!("{e:#}"))
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// Starts `weft-proxy` in the pod as [`PROXY_UID`] with `env` (`WEFT_PROXY_*` settings; the
    /// admin listener defaults to `0.0.0.0:4191` and logging to `warn,weft=info`) and waits until
    /// its admin `/ready` answers 200.
    pub fn start_proxy(&self, env: &[(&str, &str)]) -> Result<PodProxy> {
        let bin = crate::bin("weft-proxy")?;
        let mut cmd = self.command("setpriv");
        let (uid, gid) = (
            format!("--reuid={PROXY_UID}"),
            format!("--regid={PROXY_UID}"),
        );
        cmd.args([uid.as_str(), gid.as_str(), "--clear-groups"])
            .arg(&bin)
            .env("WEFT_PROXY_LOG", "warn,weft=info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let admin: SocketAddr = env
            .iter()
            .find(|(k, _)| *k == "WEFT_PROXY_ADMIN_ADDR")
            .map(|(_, v)| v.parse())
            .transpose()?
            .unwrap_or(SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)));
        // Scrape over loopback: the redirect rules leave loopback traffic alone.
        let admin = match admin.ip() {
            IpAddr::V4(a) if a.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], admin.port())),
            IpAddr::V6(a) if a.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], admin.port())),
            _ => admin,
        };
        let mut process = self.spawn("weft-proxy", cmd)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // An exit (bad config, bind failure, cannot exec as the proxy UID) fails at once.
            process.check_running()?;
            if let Ok((200, _)) = self.run(|| admin_get(admin, "/ready")) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "weft-proxy in pod {} not ready within 10s; log:\n{}",
                    self.name,
                    tail(&process.log(), 4000)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(PodProxy {
            pod: self.clone(),
            admin,
            process,
        })
    }
}

/// A `weft-proxy` running inside a pod.
#[derive(Debug)]
pub struct PodProxy {
    pod: Pod,
    pub admin: SocketAddr,
    pub process: Process,
}

impl PodProxy {
    /// Scrapes `/metrics` from inside the pod.
    pub fn metrics(&self) -> Result<Metrics> {
        let (status, body) = self.pod.run(|| admin_get(self.admin, "/metrics"))?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(Metrics::parse(&body))
    }

    /// Waits until `name{labels}` sums to exactly `want`; on timeout, says what it was.
    pub fn wait_metric(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Result<()> {
        let mut last = f64::NAN;
        eventually(Duration::from_secs(5), || {
            last = self.metrics()?.sum(name, labels);
            Ok(last == want)
        })
        .with_context(|| format!("{name}{labels:?} is {last}, want {want}"))
    }
}

/// A process started in a pod; it and its process group are killed on drop.
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Fails (with the log's tail) if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited: {status}\n{}",
                self.name,
                tail(&self.log(), 4000)
            );
        }
        Ok(())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // While the child is unreaped its pid, and so its process group id, cannot be reused.
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on the process group this child leads (spawned with process_group(0)).
            unsafe {
                libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

/// A TCP echo server on a thread inside a pod; records each peer address. Stops on drop.
pub struct EchoServer {
    pub addr: SocketAddr,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for EchoServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EchoServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl EchoServer {
    /// Listens on `addr` inside `pod` (an IPv6 address listens on IPv6 only).
    pub fn start(pod: &Pod, addr: SocketAddr) -> Result<Self> {
        let ns = pod.ns.clone();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (p, s) = (peers.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let listener = enter_namespace(&ns).and_then(|()| {
                let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            });
            let listener = match listener {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            // Non-blocking accept polled against the stop flag, so drop can join the thread.
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        if let Ok(mut peers) = p.lock() {
                            peers.push(peer);
                        }
                        std::thread::spawn(move || echo(conn));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(5))
            .context("echo server thread did not start")??;
        Ok(Self {
            addr,
            peers,
            stop,
            thread: Some(thread),
        })
    }

    /// The addresses connections came from, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().map(|p| p.clone()).unwrap_or_default()
    }
}

fn echo(mut conn: TcpStream) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = conn.shutdown(std::net::Shutdown::Write);
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread into namespace `ns`.
fn enter_namespace(ns: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(ns);
    let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns(2) on a valid fd for the current thread only; no memory is shared.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns({}) failed: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Runs `ip` with `args`, failing with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip (is iproute2 installed? scripts/setup.sh installs it)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// SIGKILLs every process whose network namespace is `ns` (never this test process).
fn kill_namespace_processes(ns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() else {
        return;
    };
    let me = std::process::id();
    for pid in String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|&p| p != me && p > 1)
    {
        // SAFETY: kill(2) with a pid `ip netns pids` just listed.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// Deletes `wt<pid>-*` namespaces whose test process is gone.
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("wt")
            .and_then(|r| r.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            kill_namespace_processes(&name);
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}
