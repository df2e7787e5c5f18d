//! Pods as network namespaces around a "node" namespace, for weft-datapath's root-only tests.
//!
//! Each [`Node`] is its own namespace holding the host-side veths (`h0`, `h1`, ...), the
//! per-pod /32 and /128 routes and forwarding, so tests never touch the real host's routing
//! and can run in parallel: pod `i` is `10.200.0.(10+i)` and `fd00::(10+i)` (hex), its
//! default routes go via 169.254.1.1 (answered by proxy ARP on the host veth) and fe80::1 (an
//! address on the host veth). Datapath pins go to `/sys/fs/bpf/weft-test-<pid>/<test>-<n>`.
//!
//! Names are `wdp<pid>-<n>-*`; dropping the [`Node`] detaches, unpins and deletes them, also
//! when the test panics, and a later run removes what a killed run left behind.

#![allow(dead_code)] // each test file uses a different part

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// How long a probe waits for a connection or an answer before calling it dropped.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long an expected-to-pass probe is retried (first packets wait for ARP/ND).
pub const ALLOW_DEADLINE: Duration = Duration::from_secs(5);

/// Ok(true) to run, Ok(false) to skip (not root, not CI), Err in CI without root.
pub fn require_root(test: &str) -> Result<bool> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(true);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!("{test} needs root and CI=true: CI must run the eBPF namespace tests as root");
    }
    eprintln!("skipping {test}: needs root (network namespaces, eBPF); runs in CI");
    Ok(false)
}

fn ip_bin() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip")
}

pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new(ip_bin())
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sysctl(ns: &str, settings: &[&str]) -> Result<()> {
    let mut args = vec!["netns", "exec", ns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    ip(&args).map(drop)
}

/// Runs `f` on a thread that joined network namespace `ns`. Sockets made there stay in `ns`
/// wherever they are used afterwards.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let file = File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on a valid namespace fd; it only changes this thread.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// The host-side veth's name and ifindex (in the node namespace).
    pub host_if: String,
    pub ifindex: u32,
}

impl Pod {
    pub fn addr(&self, v6: bool, port: u16) -> SocketAddr {
        if v6 {
            SocketAddr::new(IpAddr::V6(self.v6), port)
        } else {
            SocketAddr::new(IpAddr::V4(self.v4), port)
        }
    }

    /// A TCP connection from this pod, or the connect error (timeout: dropped).
    pub fn connect(&self, to: SocketAddr) -> Result<std::io::Result<TcpStream>> {
        in_ns(&self.ns, || TcpStream::connect_timeout(&to, PROBE_TIMEOUT))
    }

    /// Whether a TCP connection to `to` opens and echoes a line.
    pub fn tcp_ok(&self, to: SocketAddr) -> Result<bool> {
        match self.connect(to)? {
            Ok(mut s) => Ok(echo(&mut s)),
            Err(_) => Ok(false),
        }
    }

    /// Whether a UDP datagram to `to` comes back (from an [`UdpEcho`]).
    pub fn udp_ok(&self, to: SocketAddr) -> Result<bool> {
        let bind: SocketAddr = if to.is_ipv6() {
            "[::]:0".parse()?
        } else {
            "0.0.0.0:0".parse()?
        };
        let sock = in_ns(&self.ns, || UdpSocket::bind(bind))??;
        sock.set_read_timeout(Some(PROBE_TIMEOUT))?;
        sock.send_to(b"ping", to)?;
        let mut buf = [0u8; 16];
        Ok(matches!(sock.recv_from(&mut buf), Ok((4, from)) if from == to && &buf[..4] == b"ping"))
    }

    /// Polls a probe until it passes, failing after [`ALLOW_DEADLINE`].
    pub fn expect(&self, what: &str, mut probe: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + ALLOW_DEADLINE;
        loop {
            if probe()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{what}: still not passing after {ALLOW_DEADLINE:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A probe that must fail twice in a row (each waits [`PROBE_TIMEOUT`]).
    pub fn expect_dropped(
        &self,
        what: &str,
        mut probe: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        for _ in 0..2 {
            if probe()? {
                bail!("{what}: passed, expected it to be dropped");
            }
        }
        Ok(())
    }
}

/// Writes a line and expects it echoed back.
pub fn echo(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let mut buf = [0u8; 5];
    s.write_all(b"ping\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"ping\n"
}

/// A TCP echo server on `[::]:port` (both families) in a pod.
pub struct TcpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpEcho {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let listener = in_ns(&pod.ns, || TcpListener::bind(("::", port)))?
            .with_context(|| format!("listening on TCP {port} in {}", pod.ns))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        std::thread::spawn(move || {
                            let _ = conn.set_nonblocking(false);
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
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP echo server on `[::]:port` in a pod.
pub struct UdpEcho {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpEcho {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let sock = in_ns(&pod.ns, || UdpSocket::bind(("::", port)))?
            .with_context(|| format!("binding UDP {port} in {}", pod.ns))?;
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
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A node namespace with pods, and the test's pin directory. Deletes all of it on drop.
pub struct Node {
    pub ns: String,
    pub pods: Vec<Pod>,
    pub pin_dir: PathBuf,
    prefix: String,
}

fn test_pin_root() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/weft-test-{}", std::process::id()))
}

impl Node {
    pub fn new(test: &str, pods: usize) -> Result<Node> {
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("wdp{}-{n}", std::process::id());
        let mut node = Node {
            ns: format!("{prefix}-n"),
            pods: Vec::new(),
            pin_dir: test_pin_root().join(format!("{test}-{n}")),
            prefix,
        };
        // From here on Drop removes whatever exists.
        let ns = node.ns.clone();
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        sysctl(
            &ns,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ],
        )?;
        // Proxy ARP answers for addresses routed out of another interface; on a real host the
        // default route does that for the pods' gateway 169.254.1.1, here this route does.
        ip(&["-n", &ns, "route", "add", "169.254.1.1/32", "dev", "lo"])?;
        for i in 0..pods {
            let pod_ns = format!("{}-{i}", node.prefix);
            let host_if = format!("h{i}");
            let v4 = Ipv4Addr::new(10, 200, 0, 10 + i as u8);
            let v6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10 + i as u16);
            ip(&["netns", "add", &pod_ns])?;
            node.pods.push(Pod {
                ns: pod_ns.clone(),
                v4,
                v6,
                host_if: host_if.clone(),
                ifindex: 0,
            });
            ip(&["-n", &pod_ns, "link", "set", "lo", "up"])?;
            sysctl(
                &pod_ns,
                &[
                    "net.ipv6.conf.default.accept_dad=0",
                    "net.ipv6.conf.all.accept_dad=0",
                ],
            )?;
            ip(&[
                "-n", &ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                "netns", &pod_ns,
            ])?;
            // Host side: proxy ARP answers for the pod's gateway, fe80::1 is its v6 gateway.
            sysctl(
                &ns,
                &[
                    &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
                    // Answer at once (the default delays proxy answers by up to 0.8 s).
                    &format!("net.ipv4.neigh.{host_if}.proxy_delay=0"),
                ],
            )?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                "fe80::1/64",
                "dev",
                &host_if,
                "nodad",
            ])?;
            ip(&["-n", &ns, "link", "set", &host_if, "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("{v4}/32"),
                "dev",
                &host_if,
            ])?;
            ip(&[
                "-n",
                &ns,
                "-6",
                "route",
                "add",
                &format!("{v6}/128"),
                "dev",
                &host_if,
            ])?;
            // Pod side.
            ip(&[
                "-n",
                &pod_ns,
                "addr",
                "add",
                &format!("{v4}/32"),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                &pod_ns,
                "-6",
                "addr",
                "add",
                &format!("{v6}/128"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ip(&["-n", &pod_ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &pod_ns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            ip(&[
                "-n",
                &pod_ns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n", &pod_ns, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ])?;
            let ifindex = in_ns(&ns, || weft_datapath::if_index(&host_if))?
                .with_context(|| format!("no {host_if} in {ns}"))?;
            if let Some(p) = node.pods.last_mut() {
                p.ifindex = ifindex;
            }
        }
        Ok(node)
    }

    pub fn pod(&self, i: usize) -> &Pod {
        &self.pods[i]
    }

    /// Runs `f` in the node namespace (where attach and tcx queries must run).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_ns(&self.ns, f)
    }

    /// The number of tcx programs attached to a host veth per direction (ingress, egress).
    pub fn tcx_programs(&self, host_if: &str) -> Result<(usize, usize)> {
        use aya::programs::{SchedClassifier, TcAttachType};
        self.run(|| -> Result<(usize, usize)> {
            let (_, ingress) = SchedClassifier::query_tcx(host_if, TcAttachType::Ingress)?;
            let (_, egress) = SchedClassifier::query_tcx(host_if, TcAttachType::Egress)?;
            Ok((ingress.len(), egress.len()))
        })?
    }

    /// Namespaces of this node that exist right now.
    pub fn namespaces(&self) -> Result<Vec<String>> {
        Ok(ip(&["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(str::to_string)
            .collect())
    }

    /// Deletes the namespaces now (Drop does it too).
    pub fn delete_namespaces(&self) {
        for p in &self.pods {
            let _ = ip(&["netns", "del", &p.ns]);
        }
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Err(e) = weft_datapath::unpin_all(&self.pin_dir) {
            eprintln!("cleanup: {e}");
        }
        // The test's pin root goes when its last test is done.
        let _ = std::fs::remove_dir(test_pin_root());
        self.delete_namespaces();
    }
}

/// Removes namespaces and pin directories of test processes that no longer exist.
fn remove_stale() {
    let alive = |pid: &str| Path::new(&format!("/proc/{pid}")).exists();
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix("wdp") else {
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
    if let Ok(rd) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in rd.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("weft-test-")) else {
                continue;
            };
            if !alive(pid) {
                if let Ok(dirs) = std::fs::read_dir(entry.path()) {
                    for d in dirs.flatten() {
                        let _ = weft_datapath::unpin_all(d.path());
                    }
                }
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}
