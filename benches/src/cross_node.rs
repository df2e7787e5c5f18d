//! `weft-bench cross-node` (root): issue 14's figure for pods across nodes: TCP throughput
//! between pods on two nodes over Weft's direct routing and over its VXLAN overlay (each with
//! the eBPF datapath on the pods' veths and the agents running), against the same underlay
//! with plain kernel routes and no eBPF program anywhere, measured in the same run.
//!
//! ```text
//! fabric ns: br0 ── u1 ══ eth0 node-1 (192.168.77.11) ── veth ── pod a (10.77.1.x)
//!                └─ u2 ══ eth0 node-2 (192.168.77.12) ── veth ── pod b (10.77.2.x)
//! baseline:  static routes 10.77.2.0/24 via 192.168.77.12 (and back); pods wired by hand
//! direct:    weft-cni-agent --routing direct on both nodes, pods by weft-cni
//! vxlan:     weft-cni-agent --routing vxlan (weft_vxlan + the overlay program), MTU 1450
//! ```
//!
//! Each variant gets a fresh two-node cluster (`weft_netns_testing::Cluster`); iperf3 runs in
//! the pods (server in pod b, client in pod a, `--streams` streams, 1 s omitted). Rounds
//! alternate the variants' order (ABC, CBA, ...); a ratio is the variant's rate over the
//! baseline's of the same round, and the report gives the median per variant. The agent and
//! plugin binaries are taken from this executable's directory (`cargo build --release -p
//! weft-cni -p weft-cni-agent -p weft-bench`) or `--bin-dir`.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use weft_netns_testing::{
    stop_child, unique, wire_pod, Cluster, ClusterSpec, Netns, NodeAgent, PodLink,
};

use crate::cli::parse_duration;

#[derive(Debug, Clone, Args)]
pub struct CrossNodeArgs {
    /// Rounds of the three variants.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// iperf3 duration per variant and round.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Parallel TCP streams.
    #[arg(long, default_value_t = 1)]
    pub streams: usize,
    /// Where weft-cni-agent and weft-cni are (default: this executable's directory).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

const IPERF_PORT: u16 = 5299;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Baseline,
    Direct,
    Vxlan,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Baseline, Variant::Direct, Variant::Vxlan];

    fn name(self) -> &'static str {
        match self {
            Variant::Baseline => "no eBPF, static routes",
            Variant::Direct => "eBPF, direct routing",
            Variant::Vxlan => "eBPF, VXLAN",
        }
    }
}

/// One variant's world: the cluster, its agents, its two pods.
struct World {
    // Field order: pods, then agents, then the cluster go.
    client: Netns,
    server: Netns,
    server_ip: Ipv4Addr,
    pod_mtu: u32,
    _agents: Vec<NodeAgent>,
    _cluster: Cluster,
}

fn bins(args: &CrossNodeArgs) -> Result<(PathBuf, PathBuf)> {
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .context("finding this executable")?
            .parent()
            .context("this executable's directory")?
            .to_path_buf(),
    };
    let agent = dir.join("weft-cni-agent");
    let plugin = dir.join("weft-cni");
    for p in [&agent, &plugin] {
        ensure!(
            p.exists(),
            "{} is missing: cargo build --release -p weft-cni -p weft-cni-agent (or --bin-dir)",
            p.display()
        );
    }
    Ok((agent, plugin))
}

fn build(variant: Variant, agent: &Path, plugin: &Path) -> Result<World> {
    let cluster = Cluster::new(ClusterSpec::two_nodes("wxb"))?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    // In node-1's scratch directory: removed with the cluster.
    let manifests = n1.dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("nodes.yaml"), cluster.nodes_yaml())?;
    match variant {
        Variant::Baseline => {
            cluster.static_routes()?;
            let client = Netns::named(unique("wxb", "a"))?;
            let server = Netns::named(unique("wxb", "b"))?;
            let (a, b) = (Ipv4Addr::new(10, 77, 1, 10), Ipv4Addr::new(10, 77, 2, 10));
            for (node, pod, ip) in [(n1, &client, a), (n2, &server, b)] {
                wire_pod(&PodLink {
                    node: &node.ns.name,
                    pod: &pod.name,
                    host_if: "pod0",
                    v4: ip,
                    v6: None,
                    src_v4: None,
                    src_v6: None,
                })?;
            }
            Ok(World {
                client,
                server,
                server_ip: b,
                pod_mtu: 1500,
                _agents: Vec::new(),
                _cluster: cluster,
            })
        }
        Variant::Direct | Variant::Vxlan => {
            let mode = if variant == Variant::Direct {
                "direct"
            } else {
                "vxlan"
            };
            let args = ["--routing", mode, "--underlay-dev", "eth0"];
            let agents = vec![
                n1.spawn_agent(agent, &manifests, &args)?,
                n2.spawn_agent(agent, &manifests, &args)?,
            ];
            // The routes follow the Nodes right after the first sync.
            let want = if variant == Variant::Direct {
                "10.77.2.0/24 via"
            } else {
                "10.77.2.0/24 dev weft_vxlan"
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !n1.ns.ip(&["route", "show", "proto", "87"])?.contains(want) {
                if std::time::Instant::now() > deadline {
                    bail!("{}: no route to node-2's pods after 5 s", variant.name());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let a = n1.add_pod(plugin, ("bench", "a"), None)?;
            let b = n2.add_pod(plugin, ("bench", "b"), None)?;
            let pod_mtu = weft_netns_testing::ClusterNode::mtu_of(&a.ns, "eth0")?;
            // The pods' namespaces outlive the ClusterPod handles (moved out below).
            let (client, server, server_ip) = (a.ns, b.ns, b.v4);
            Ok(World {
                client,
                server,
                server_ip,
                pod_mtu,
                _agents: agents,
                _cluster: cluster,
            })
        }
    }
}

/// iperf3 from the client pod to the server pod: the receiver's rate in Gbit/s, and the
/// retransmits.
fn iperf(w: &World, duration: Duration, streams: usize) -> Result<(f64, u64)> {
    let mut server = w
        .server
        .command("iperf3")?
        .args(["-s", "-1", "-B", &w.server_ip.to_string()])
        .args(["-p", &IPERF_PORT.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s")?;
    let mut last = String::new();
    for _ in 0..20 {
        let out = w
            .client
            .command("iperf3")?
            .args([
                "-c",
                &w.server_ip.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
            ])
            .args(["-t", &format!("{:.0}", duration.as_secs_f64().max(1.0))])
            .args(["-O", "1", "-P", &streams.to_string(), "-J"])
            .output()
            .context("running iperf3 -c")?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            let retransmits = v["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0);
            let _ = server.kill();
            let _ = server.wait();
            return Ok((bps / 1e9, retransmits));
        }
        last = v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned());
        std::thread::sleep(Duration::from_millis(100));
    }
    stop_child(server);
    bail!("iperf3 did not run: {last}")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub fn execute(args: CrossNodeArgs) -> Result<()> {
    ensure!(
        weft_netns_testing::require_root("weft-bench cross-node", "network namespaces, eBPF"),
        "weft-bench cross-node needs root"
    );
    crate::cli::warn_if_debug_build();
    let (agent, plugin) = bins(&args)?;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut retransmits = [0u64; 3];
    let mut mtus = [0u32; 3];
    for round in 0..args.rounds {
        let mut order = Variant::ALL.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut this = [0f64; 3];
        for v in order {
            let i = Variant::ALL.iter().position(|x| *x == v).unwrap_or(0);
            let world = build(v, &agent, &plugin).with_context(|| v.name())?;
            let (gbit, rtx) =
                iperf(&world, args.duration, args.streams).with_context(|| v.name().to_string())?;
            eprintln!(
                "round {}: {:<24} {gbit:7.2} Gbit/s ({rtx} retransmits, pod MTU {})",
                round + 1,
                v.name(),
                world.pod_mtu
            );
            this[i] = gbit;
            rates[i].push(gbit);
            retransmits[i] += rtx;
            mtus[i] = world.pod_mtu;
        }
        for i in 0..3 {
            ratios[i].push(this[i] / this[0]);
        }
    }
    println!(
        "cross-node TCP throughput, {} round(s) of {:?}, {} stream(s); ratio = variant / baseline of the same round\n",
        args.rounds, args.duration, args.streams
    );
    println!("| path | pod MTU | Gbit/s (median) | ratio to baseline (median) | retransmits |");
    println!("|---|---|---|---|---|");
    for (i, v) in Variant::ALL.iter().enumerate() {
        println!(
            "| {} | {} | {:.2} | {:.3} | {} |",
            v.name(),
            mtus[i],
            median(&mut rates[i]),
            median(&mut ratios[i]),
            retransmits[i]
        );
    }
    Ok(())
}
