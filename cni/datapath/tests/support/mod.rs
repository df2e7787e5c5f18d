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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
pub use weft_netns_testing::{in_ns, ip, TcpEcho, UdpEcho};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// How long a probe waits for a connection or an answer before calling it dropped.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long an expected-to-pass probe is retried (first packets wait for ARP/ND).
pub const ALLOW_DEADLINE: Duration = Duration::from_secs(5);

/// Ok(true) to run, Ok(false) to skip (not root, not CI); panics in CI without root.
pub fn require_root(test: &str) -> Result<bool> {
    Ok(weft_netns_testing::require_root(
        test,
        "network namespaces, eBPF",
    ))
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
        Ok(in_ns(&self.ns, || {
            weft_netns_testing::udp_echo_ok(bind, to, PROBE_TIMEOUT)
        })??)
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
    weft_netns_testing::echo(s, PROBE_TIMEOUT)
}

/// A TCP echo server on `[::]:port` (both families) in a pod.
pub fn tcp_echo(pod: &Pod, port: u16) -> Result<TcpEcho> {
    TcpEcho::start(&pod.ns, (Ipv6Addr::UNSPECIFIED, port).into())
}

/// A UDP echo server on `[::]:port` in a pod.
pub fn udp_echo(pod: &Pod, port: u16) -> Result<UdpEcho> {
    UdpEcho::start(&pod.ns, (Ipv6Addr::UNSPECIFIED, port).into())
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
        weft_netns_testing::router(&ns)?;
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
            weft_netns_testing::wire_pod(&weft_netns_testing::PodLink {
                node: &ns,
                pod: &pod_ns,
                host_if: &host_if,
                v4,
                v6: Some(v6),
                src_v4: None,
                src_v6: None,
            })?;
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
    weft_netns_testing::remove_stale("wdp", Path::new("/sys/fs/bpf"), "weft-test-", |root| {
        if let Ok(dirs) = std::fs::read_dir(root) {
            for d in dirs.flatten() {
                let _ = weft_datapath::unpin_all(d.path());
            }
        }
    });
}
