//! A weft-model `World` on the real datapath, for the root-only tests that hold the eBPF
//! programs to the reference evaluator (`differential.rs`, `netpol_matrix.rs`).
//!
//! A [`Cluster`] is a node namespace with one network namespace per pod, at the addresses the
//! test's world gives them (so ipBlocks in the world mean the kernel's addresses), echo
//! servers on every probed port, the datapath attached to every host veth. With
//! [`Cluster::with_nodes`] the pods are spread over several node namespaces (pod `i` on node
//! `(i + i / nodes) % nodes`), each with its own datapath (its own pins), joined by an underlay bridge in a
//! fabric namespace and plain kernel routes (/32 and /128 per remote pod, via the owning
//! node's underlay address): what direct routing gives, so a pod's packets reach a pod of
//! another node with their addresses unchanged and are judged by the datapaths of both ends. [`Cluster::install`]
//! compiles a world with weft-model's compiler, writes every endpoint's flags and entries and
//! flushes conntrack, as the agent would; [`Cluster::probe`] runs real TCP and UDP exchanges
//! in parallel.
//!
//! The namespace plumbing is weft-netns-testing's, as for `support/mod.rs`, with pod
//! addresses chosen by the caller and an optional address of the node itself (a non-pod
//! peer, on the node's loopback, used as the source of node-to-pod connections). Names are
//! `wdp<pid>-<n>-*` like support's, so either cleans up what a killed run of the other left
//! behind.

#![allow(dead_code)] // each test file uses a different part

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use weft_datapath::{Datapath, EndpointFlags, PolicyMaps};
use weft_model::netpol::{
    self, assign_policy_ids, CompileError, CompiledEndpoint, PolicyIds, World,
};
use weft_model::ObjectKey;
use weft_netns_testing::{enter, in_ns, ip, PodLink, TcpEcho, UdpEcho};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// How long a first probe waits before calling the exchange dropped. Probes run in parallel,
/// so a round of denials costs about this much.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(250);
/// Probes the evaluator allows that failed are retried this many times with
/// [`RETRY_TIMEOUT`] (a first packet may wait for ARP/ND; a loaded machine may be slow). A
/// probe that passes is never retried: a pass cannot be an accident.
pub const RETRIES: usize = 2;
pub const RETRY_TIMEOUT: Duration = Duration::from_millis(1500);

/// Ok(true) to run, Ok(false) to skip (not root, not CI); panics in CI without root.
pub fn require_root(test: &str) -> Result<bool> {
    Ok(weft_netns_testing::require_root(
        test,
        "network namespaces, eBPF",
    ))
}

/// A pod to build: its key in the world and its addresses.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub key: ObjectKey,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
}

/// A built pod.
#[derive(Clone, Debug)]
pub struct Pod {
    pub key: ObjectKey,
    /// Its network namespace.
    pub ns: String,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    pub host_if: String,
    pub ifindex: u32,
    /// Its endpoint id in the datapath.
    pub ep_id: u32,
    /// The node it runs on (index into [`Cluster::nodes`]).
    pub node: usize,
}

/// The transport of a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Transport {
    Tcp,
    Udp,
}

impl Transport {
    pub fn model(self) -> netpol::Protocol {
        match self {
            Transport::Tcp => netpol::Protocol::Tcp,
            Transport::Udp => netpol::Protocol::Udp,
        }
    }
}

/// One exchange: from a namespace (a pod's or the node's) to an address.
#[derive(Clone, Debug)]
pub struct Probe {
    pub from_ns: String,
    pub from: IpAddr,
    pub to: SocketAddr,
    pub transport: Transport,
}

/// What [`Cluster::install`] wrote.
#[derive(Debug)]
pub struct Installed {
    pub ids: PolicyIds,
    pub compiled: BTreeMap<ObjectKey, CompiledEndpoint>,
}

impl Installed {
    /// The endpoint's flags and entries, as written to the maps.
    pub fn describe(&self, key: &ObjectKey) -> String {
        let Some(ep) = self.compiled.get(key) else {
            return format!("{key}: not compiled\n");
        };
        let mut out = format!(
            "{key}: ingress isolated {}, egress isolated {}, {} entries\n",
            ep.ingress_isolated,
            ep.egress_isolated,
            ep.entries.len()
        );
        for e in &ep.entries {
            let _ = writeln!(out, "  {}", weft_datapath::Entry::from(e));
        }
        out
    }
}

/// A node namespace, its pods, echo servers, the datapath attached to every host veth.
/// Deletes all of it on drop.
pub struct Cluster {
    /// The first node's namespace (the node peer's addresses live there).
    pub ns: String,
    /// Every node's namespace (`nodes[0] == ns`).
    pub nodes: Vec<String>,
    pub pods: Vec<Pod>,
    /// The node's own addresses (on its loopback), when asked for.
    pub node_v4: Option<Ipv4Addr>,
    pub node_v6: Option<Ipv6Addr>,
    pub pin_dir: PathBuf,
    // Dropped before the namespaces go.
    servers: Vec<Echo>,
    /// One per node.
    dps: Vec<Datapath>,
    prefix: String,
    fabric: Option<String>,
}

fn test_pin_root() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/weft-test-{}", std::process::id()))
}

impl Cluster {
    /// Builds the node and `pods`; the node gets `node_v4` / `node_v6` on its loopback and
    /// uses them as the source of its connections to pods. Every pod (and the node, when it
    /// has an address) serves TCP and UDP echo on the given ports.
    pub fn new(
        test: &str,
        pods: &[PodSpec],
        node_v4: Option<Ipv4Addr>,
        node_v6: Option<Ipv6Addr>,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<Cluster> {
        Cluster::with_nodes(test, 1, pods, node_v4, node_v6, tcp_ports, udp_ports)
    }

    /// [`Cluster::new`] over `nodes` node namespaces (1 to 9): pod `i` on node
    /// `(i + i / nodes) % nodes`;
    /// the node peer's addresses are on the first node.
    pub fn with_nodes(
        test: &str,
        nodes: usize,
        pods: &[PodSpec],
        node_v4: Option<Ipv4Addr>,
        node_v6: Option<Ipv6Addr>,
        tcp_ports: &[u16],
        udp_ports: &[u16],
    ) -> Result<Cluster> {
        anyhow::ensure!((1..=9).contains(&nodes), "1 to 9 nodes, not {nodes}");
        remove_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("wdp{}-{n}", std::process::id());
        let mut cluster = Cluster {
            ns: format!("{prefix}-n"),
            nodes: Vec::new(),
            pods: Vec::new(),
            node_v4,
            node_v6,
            pin_dir: test_pin_root().join(format!("{test}-{n}")),
            servers: Vec::new(),
            dps: Vec::new(),
            prefix: prefix.clone(),
            fabric: None,
        };
        // From here on Drop removes whatever exists.
        let ns = cluster.ns.clone();
        for j in 0..nodes {
            let node = if j == 0 {
                ns.clone()
            } else {
                format!("{prefix}-n{j}")
            };
            ip(&["netns", "add", &node])?;
            cluster.nodes.push(node.clone());
            weft_netns_testing::router(&node)?;
        }
        if nodes > 1 {
            cluster.underlay()?;
        }
        if let Some(a) = node_v4 {
            ip(&["-n", &ns, "addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        if let Some(a) = node_v6 {
            ip(&[
                "-n",
                &ns,
                "-6",
                "addr",
                "add",
                &format!("{a}/128"),
                "dev",
                "lo",
                "nodad",
            ])?;
        }
        for (i, spec) in pods.iter().enumerate() {
            let pod = cluster.add_pod(i, spec)?;
            cluster.pods.push(pod);
        }
        if nodes > 1 {
            cluster.remote_routes()?;
        }
        for pod in &cluster.pods {
            for &port in tcp_ports {
                cluster
                    .servers
                    .push(Echo::start(&pod.ns, Transport::Tcp, port)?);
            }
            for &port in udp_ports {
                cluster
                    .servers
                    .push(Echo::start(&pod.ns, Transport::Udp, port)?);
            }
        }
        if node_v4.is_some() || node_v6.is_some() {
            for &port in tcp_ports {
                cluster
                    .servers
                    .push(Echo::start(&ns, Transport::Tcp, port)?);
            }
            for &port in udp_ports {
                cluster
                    .servers
                    .push(Echo::start(&ns, Transport::Udp, port)?);
            }
        }
        for j in 0..nodes {
            let mut dp = Datapath::open(cluster.node_pin_dir(j)).context("opening the datapath")?;
            for pod in cluster.pods.iter().filter(|p| p.node == j) {
                in_ns(&cluster.nodes[j], || dp.attach(pod.ifindex))?
                    .with_context(|| format!("attaching to {}", pod.host_if))?;
                dp.set_endpoint(pod.ifindex, pod.ep_id, EndpointFlags::NONE)?;
            }
            cluster.dps.push(dp);
        }
        Ok(cluster)
    }

    /// Node `j`'s pin directory: the cluster's for the first node.
    fn node_pin_dir(&self, j: usize) -> PathBuf {
        if j == 0 {
            self.pin_dir.clone()
        } else {
            let mut p = self.pin_dir.clone().into_os_string();
            p.push(format!("-n{j}"));
            PathBuf::from(p)
        }
    }

    /// Node `j`'s underlay addresses.
    fn underlay_addrs(j: usize) -> (Ipv4Addr, Ipv6Addr) {
        (
            Ipv4Addr::new(192, 168, 78, j as u8 + 1),
            Ipv6Addr::new(0xfd01, 0, 0, 0, 0, 0, 0, j as u16 + 1),
        )
    }

    /// A fabric namespace with a bridge, each node's `eth0` on it.
    fn underlay(&mut self) -> Result<()> {
        let fabric = format!("{}-f", self.prefix);
        ip(&["netns", "add", &fabric])?;
        self.fabric = Some(fabric.clone());
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        for (j, node) in self.nodes.iter().enumerate() {
            let port = format!("u{j}");
            ip(&[
                "-n", &fabric, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", node,
            ])?;
            ip(&["-n", &fabric, "link", "set", &port, "master", "br0", "up"])?;
            let (v4, v6) = Self::underlay_addrs(j);
            ip(&["-n", node, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                node,
                "addr",
                "add",
                &format!("{v4}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&[
                "-n",
                node,
                "-6",
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        Ok(())
    }

    /// On every node, routes to the other nodes' pods (and to the node peer's addresses)
    /// via the owning node's underlay address; the first node sends from the node peer's.
    fn remote_routes(&self) -> Result<()> {
        let mut remote: Vec<(IpAddr, usize)> = Vec::new();
        for p in &self.pods {
            remote.push((IpAddr::V4(p.v4), p.node));
            if let Some(v6) = p.v6 {
                remote.push((IpAddr::V6(v6), p.node));
            }
        }
        remote.extend(self.node_v4.map(|a| (IpAddr::V4(a), 0)));
        remote.extend(self.node_v6.map(|a| (IpAddr::V6(a), 0)));
        for (j, node) in self.nodes.iter().enumerate() {
            for &(addr, owner) in remote.iter().filter(|(_, o)| *o != j) {
                let (v4, v6) = Self::underlay_addrs(owner);
                let (family, dst, via, src) = match addr {
                    IpAddr::V4(a) => (
                        "-4",
                        format!("{a}/32"),
                        v4.to_string(),
                        self.node_v4.filter(|_| j == 0).map(|s| s.to_string()),
                    ),
                    IpAddr::V6(a) => (
                        "-6",
                        format!("{a}/128"),
                        v6.to_string(),
                        self.node_v6.filter(|_| j == 0).map(|s| s.to_string()),
                    ),
                };
                let mut args = vec!["-n", node, family, "route", "add", &dst, "via", &via];
                if let Some(src) = &src {
                    args.extend(["src", src]);
                }
                ip(&args)?;
            }
        }
        Ok(())
    }

    fn add_pod(&self, i: usize, spec: &PodSpec) -> Result<Pod> {
        // Alternating, with a shift each round: with two nodes and pods in pairs per
        // namespace, each namespace's pair is split and every other pod goes to the second.
        let n = self.nodes.len();
        let node = (i + i / n) % n;
        let ns = &self.nodes[node];
        // The node peer's addresses exist on the first node only.
        let (src_v4, src_v6) = if node == 0 {
            (self.node_v4, self.node_v6)
        } else {
            (None, None)
        };
        let pod_ns = format!("{}-{i}", self.prefix);
        let host_if = format!("h{i}");
        ip(&["netns", "add", &pod_ns])?;
        weft_netns_testing::wire_pod(&PodLink {
            node: ns,
            pod: &pod_ns,
            host_if: &host_if,
            v4: spec.v4,
            v6: spec.v6,
            src_v4,
            src_v6,
        })?;
        let ifindex = in_ns(ns, || weft_datapath::if_index(&host_if))?
            .with_context(|| format!("no {host_if} in {ns}"))?;
        Ok(Pod {
            key: spec.key.clone(),
            ns: pod_ns,
            v4: spec.v4,
            v6: spec.v6,
            host_if,
            ifindex,
            ep_id: i as u32 + 1,
            node,
        })
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.iter().find(|p| &p.key == key)
    }

    /// The namespace whose traffic comes from `addr`: a pod's, or the node's.
    pub fn ns_of(&self, addr: IpAddr) -> Option<&str> {
        if Some(addr) == self.node_v4.map(IpAddr::V4) || Some(addr) == self.node_v6.map(IpAddr::V6)
        {
            return Some(&self.ns);
        }
        self.pods
            .iter()
            .find(|p| IpAddr::V4(p.v4) == addr || p.v6.map(IpAddr::V6) == Some(addr))
            .map(|p| p.ns.as_str())
    }

    /// Compiles `world` for every pod and writes flags and entries, then flushes every
    /// endpoint's conntrack (the next packet of anything open is judged anew). Every pod of
    /// the cluster must be a pod of the world.
    pub fn install(&mut self, world: &World) -> Result<Installed, InstallError> {
        let ids = assign_policy_ids(world.policies());
        let keys: Vec<ObjectKey> = self.pods.iter().map(|p| p.key.clone()).collect();
        let compiled = netpol::compile(world, &keys, &ids)?;
        for pod in &self.pods {
            let dp = &mut self.dps[pod.node];
            let ep = &compiled[&pod.key];
            let mut flags = EndpointFlags::NONE;
            if ep.ingress_isolated {
                flags = flags | EndpointFlags::INGRESS_ISOLATED;
            }
            if ep.egress_isolated {
                flags = flags | EndpointFlags::EGRESS_ISOLATED;
            }
            let entries: Vec<weft_datapath::Entry> =
                ep.entries.iter().map(weft_datapath::Entry::from).collect();
            dp.replace_policy(pod.ep_id, &entries)
                .map_err(|e| InstallError::Datapath(format!("{}: {e}", pod.key)))?;
            dp.set_endpoint(pod.ifindex, pod.ep_id, flags)
                .map_err(|e| InstallError::Datapath(format!("{}: {e}", pod.key)))?;
        }
        for pod in &self.pods {
            self.dps[pod.node]
                .flush_conntrack(pod.ep_id)
                .map_err(|e| InstallError::Datapath(format!("{}: {e}", pod.key)))?;
        }
        Ok(Installed { ids, compiled })
    }

    /// Runs every probe, in parallel; `want[i]` is what probe `i` should do. Probes that fail
    /// where `want` says pass are retried ([`RETRIES`], [`RETRY_TIMEOUT`]); the result is what
    /// each probe did in the end.
    pub fn probe(&self, probes: &[Probe], want: &[bool]) -> Vec<bool> {
        let mut got = run_probes(probes, PROBE_TIMEOUT);
        for _ in 0..RETRIES {
            let again: Vec<usize> = (0..probes.len()).filter(|&i| want[i] && !got[i]).collect();
            if again.is_empty() {
                break;
            }
            let retry: Vec<Probe> = again.iter().map(|&i| probes[i].clone()).collect();
            for (i, ok) in again.into_iter().zip(run_probes(&retry, RETRY_TIMEOUT)) {
                got[i] = ok;
            }
        }
        got
    }
}

/// Why a world could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The compiler refused the world (more port ranges than an entry holds).
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("writing the maps: {0}")]
    Datapath(String),
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.servers.clear();
        self.dps.clear();
        for j in 0..self.nodes.len().max(1) {
            if let Err(e) = weft_datapath::unpin_all(self.node_pin_dir(j)) {
                eprintln!("cleanup: {e}");
            }
        }
        let _ = std::fs::remove_dir(test_pin_root());
        for p in &self.pods {
            let _ = ip(&["netns", "del", &p.ns]);
        }
        for node in &self.nodes {
            let _ = ip(&["netns", "del", node]);
        }
        let _ = ip(&["netns", "del", &self.ns]);
        if let Some(f) = &self.fabric {
            let _ = ip(&["netns", "del", f]);
        }
    }
}

/// Every probe on its own thread (in its source namespace), all at once.
pub fn run_probes(probes: &[Probe], timeout: Duration) -> Vec<bool> {
    std::thread::scope(|s| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| s.spawn(move || enter(&p.from_ns).is_ok() && exchange(p, timeout)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(false))
            .collect()
    })
}

/// One TCP connection with an echoed line, or one UDP datagram echoed back, from this
/// thread's namespace.
fn exchange(p: &Probe, timeout: Duration) -> bool {
    match p.transport {
        Transport::Tcp => weft_netns_testing::tcp_echo_ok(p.to, timeout),
        Transport::Udp => {
            weft_netns_testing::udp_echo_ok(SocketAddr::new(p.from, 0), p.to, timeout)
                .unwrap_or(false)
        }
    }
}

/// A TCP or UDP echo server on `[::]:port` (both families) in a namespace.
enum Echo {
    Tcp(TcpEcho),
    Udp(UdpEcho),
}

impl Echo {
    fn start(ns: &str, transport: Transport, port: u16) -> Result<Echo> {
        let any = (Ipv6Addr::UNSPECIFIED, port).into();
        Ok(match transport {
            Transport::Tcp => Echo::Tcp(TcpEcho::start(ns, any)?),
            Transport::Udp => Echo::Udp(UdpEcho::start(ns, any)?),
        })
    }
}

/// Whether this kernel can make SCTP sockets (the module may be missing).
pub fn sctp_available() -> bool {
    // SAFETY: socket(2) with constant arguments; the fd is closed right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    if fd >= 0 {
        // SAFETY: fd is ours.
        unsafe { libc::close(fd) };
        true
    } else {
        false
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
