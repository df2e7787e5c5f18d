//! The real eBPF datapath against weft-model's reference evaluator, on random worlds (issue
//! 13, "One reference evaluator"). Needs root: skips otherwise, fails when CI=true.
//!
//! One node namespace is built once: six pods in three Kubernetes namespaces (x/a, x/b, y/a,
//! y/b, z/a, z/b at 10.0.0.1-6; x/a, y/a and z/a also at fd00::1, ::3, ::5) and the node
//! itself as a non-pod peer (10.0.0.13 and fd00::7 on its loopback, the source of its
//! connections to pods). Every pod and the node serve TCP echo on 80, 81, 4143 and 8080 and
//! UDP echo on 81 and 5353; the datapath is attached to every host veth.
//!
//! Each case draws a world from `weft_model::netpol::testing::random` around these pods:
//! random pod labels, named container ports (on TCP, UDP and SCTP, pointing at probed ports),
//! meshed pods (proxy inbound port 4143), namespace labels and implicit namespaces, and one to
//! five policies with every feature; ipBlocks and excepts are cut from 10.0.0.0/28 and
//! fd00::/125, so they cover, carve out and miss pod addresses and the node's. The world is
//! compiled for every pod, written (flags and entries), conntrack flushed; then every ordered
//! pair of peers (pods and node, v4, and v6 where both ends have it) exchanges data on every
//! probed port and protocol, all at once, and each exchange must pass exactly when
//! `evaluate` allows it. On a mismatch the failure names the connection, the evaluator's
//! verdict and reasons, what the compiler's own simulation of the lookup says (to tell a
//! compiler bug from a kernel one) and the entries of both ends; proptest then prints the
//! (shrunk) world.
//!
//! The node's address is a plain address here, as in the evaluator: the agent's extra
//! "node may always reach its pods" entries are the agent's business, not the compiler's.
//! SCTP cannot be probed with sockets on kernels without the sctp module; rules on SCTP are
//! still generated (they must not leak into TCP or UDP), and `prog_run.rs` covers SCTP
//! packets.
//!
//! The same worlds hold across nodes (issue 14): in the second test the pods are spread over
//! two node namespaces (x/a, y/b, z/a on the first with the node peer; x/b, y/a, z/b on the
//! second: every namespace and both address families cross), each with its own datapath, joined by an underlay and direct routes, so a
//! connection between pods of different nodes is judged by the source node's egress program
//! and the destination node's ingress program, with no address rewritten on the way. Every
//! verdict must still be the evaluator's: selectors of pods on the other node and ipBlocks
//! mean the same thing there.
//!
//! `WEFT_DIFFERENTIAL_CASES` changes the number of worlds (default [`CASES`], and half as
//! many across nodes), `WEFT_DIFFERENTIAL_SEED` (a number) the otherwise fixed seed.

mod world;

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{
    Config as ProptestConfig, RngAlgorithm, TestCaseError, TestRng, TestRunner,
};
use weft_model::netpol::testing::random::{self, FixedPod, GeneratedWorld, Layout};
use weft_model::netpol::{datapath_verdict, evaluate, CompileError, Connection, Peer};
use weft_model::ObjectKey;
use world::{Cluster, InstallError, PodSpec, Probe, Transport};

/// Worlds per run.
const CASES: u32 = 32;
const TCP_PORTS: [u16; 4] = [80, 81, 4143, 8080];
const UDP_PORTS: [u16; 2] = [81, 5353];
const NODE_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 13);
const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7);

fn pod_specs() -> Vec<PodSpec> {
    ["x", "y", "z"]
        .into_iter()
        .flat_map(|ns| ["a", "b"].map(|name| ObjectKey::new(ns, name)))
        .enumerate()
        .map(|(i, key)| PodSpec {
            key,
            v4: Ipv4Addr::new(10, 0, 0, i as u8 + 1),
            v6: (i % 2 == 0).then(|| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, i as u16 + 1)),
        })
        .collect()
}

fn layout(specs: &[PodSpec]) -> Layout {
    let pods = specs
        .iter()
        .map(|s| FixedPod {
            key: s.key.clone(),
            ips: std::iter::once(IpAddr::V4(s.v4))
                .chain(s.v6.map(IpAddr::V6))
                .collect(),
        })
        .collect();
    let mut ports: Vec<u16> = TCP_PORTS.iter().chain(&UDP_PORTS).copied().collect();
    ports.sort_unstable();
    ports.dedup();
    Layout {
        ports,
        proxy_inbound_ports: vec![4143],
        ..Layout::model(pods)
    }
}

/// One probed connection: the exchange and the same connection for the evaluator.
struct Conn {
    probe: Probe,
    conn: Connection,
}

/// Every ordered pair of distinct peers (pods and the node, the node not with itself), per
/// family both ends have, on every probed port and protocol.
fn connections(cluster: &Cluster) -> Vec<Conn> {
    let mut v4: Vec<IpAddr> = cluster.pods.iter().map(|p| IpAddr::V4(p.v4)).collect();
    v4.push(IpAddr::V4(NODE_V4));
    let mut v6: Vec<IpAddr> = cluster
        .pods
        .iter()
        .filter_map(|p| p.v6.map(IpAddr::V6))
        .collect();
    v6.push(IpAddr::V6(NODE_V6));
    let services: Vec<(Transport, u16)> = TCP_PORTS
        .iter()
        .map(|&p| (Transport::Tcp, p))
        .chain(UDP_PORTS.iter().map(|&p| (Transport::Udp, p)))
        .collect();
    let mut out = Vec::new();
    for family in [v4, v6] {
        for &src in &family {
            for &dst in &family {
                if src == dst {
                    continue;
                }
                for &(transport, port) in &services {
                    out.push(Conn {
                        probe: Probe {
                            from_ns: cluster.ns_of(src).expect("a peer").to_string(),
                            from: src,
                            to: SocketAddr::new(dst, port),
                            transport,
                        },
                        conn: Connection {
                            src: Peer::Ip(src),
                            dst: Peer::Ip(dst),
                            port,
                            protocol: transport.model(),
                        },
                    });
                }
            }
        }
    }
    out
}

fn peer_name(cluster: &Cluster, ip: IpAddr) -> String {
    match cluster
        .pods
        .iter()
        .find(|p| IpAddr::V4(p.v4) == ip || p.v6.map(IpAddr::V6) == Some(ip))
    {
        Some(p) => format!("{} ({ip})", p.key),
        None => format!("node ({ip})"),
    }
}

#[derive(Default)]
struct Stats {
    worlds: Cell<usize>,
    rejected: Cell<usize>,
    allowed: Cell<usize>,
    denied: Cell<usize>,
}

/// One world through the datapath; Err names every connection the kernel decided otherwise.
fn check(
    cluster: &mut Cluster,
    conns: &[Conn],
    generated: &GeneratedWorld,
    stats: &Stats,
) -> Result<(), TestCaseError> {
    let world = generated.world();
    let installed = match cluster.install(&world) {
        Ok(i) => i,
        Err(InstallError::Compile(e @ CompileError::TooManyRanges { .. })) => {
            stats.rejected.set(stats.rejected.get() + 1);
            return Err(TestCaseError::reject(e.to_string()));
        }
        Err(e) => return Err(TestCaseError::fail(e.to_string())),
    };
    let verdicts = conns
        .iter()
        .map(|c| evaluate(&world, &c.conn))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let want: Vec<bool> = verdicts.iter().map(|v| v.allowed).collect();
    let probes: Vec<Probe> = conns.iter().map(|c| c.probe.clone()).collect();
    let got = cluster.probe(&probes, &want);
    stats.worlds.set(stats.worlds.get() + 1);
    let allowed = want.iter().filter(|w| **w).count();
    stats.allowed.set(stats.allowed.get() + allowed);
    stats.denied.set(stats.denied.get() + want.len() - allowed);

    let wrong: Vec<usize> = (0..conns.len()).filter(|&i| got[i] != want[i]).collect();
    if wrong.is_empty() {
        return Ok(());
    }
    let ids: Vec<String> = installed
        .ids
        .iter()
        .map(|(k, id)| format!("{k}={id}"))
        .collect();
    let mut msg = format!(
        "the kernel disagrees with the evaluator on {} of {} connections; policy ids {}\n",
        wrong.len(),
        conns.len(),
        ids.join(", ")
    );
    let mut endpoints = Vec::new();
    for &i in wrong.iter().take(12) {
        let (c, v) = (&conns[i], &verdicts[i]);
        let simulated = datapath_verdict(&world, &installed.compiled, &c.conn)
            .map(|allowed| if allowed { "allowed" } else { "denied" }.to_string())
            .unwrap_or_else(|e| e.to_string());
        let _ = writeln!(
            msg,
            "\n{} -> {} port {}/{}: the kernel {}, the evaluator says {v}\n  \
             the compiler's simulation of the lookup says {simulated} \
             (agrees with the evaluator: a kernel or map-writer bug; else a compiler bug)",
            peer_name(cluster, c.probe.from),
            peer_name(cluster, c.probe.to.ip()),
            c.conn.port,
            c.conn.protocol,
            if got[i] { "passed it" } else { "dropped it" },
        );
        for ip in [c.probe.from, c.probe.to.ip()] {
            if let Some(p) = world.pod_by_ip(ip) {
                if !endpoints.contains(&p.key) {
                    endpoints.push(p.key.clone());
                }
            }
        }
    }
    if wrong.len() > 12 {
        let _ = writeln!(msg, "\n... and {} more", wrong.len() - 12);
    }
    msg.push_str("\nentries written:\n");
    for key in &endpoints {
        msg.push_str(&installed.describe(key));
    }
    Err(TestCaseError::fail(msg))
}

#[test]
fn the_datapath_gives_the_evaluators_verdicts() -> Result<()> {
    if !world::require_root("the_datapath_gives_the_evaluators_verdicts")? {
        return Ok(());
    }
    differential("differential", 1, CASES)
}

/// The same, with the pods on two nodes joined by direct routes.
#[test]
fn the_datapath_gives_the_evaluators_verdicts_across_nodes() -> Result<()> {
    if !world::require_root("the_datapath_gives_the_evaluators_verdicts_across_nodes")? {
        return Ok(());
    }
    differential("differential-nodes", 2, CASES / 2)
}

fn differential(test: &str, nodes: usize, default_cases: u32) -> Result<()> {
    let started = Instant::now();
    let specs = pod_specs();
    let mut cluster = Cluster::with_nodes(
        test,
        nodes,
        &specs,
        Some(NODE_V4),
        Some(NODE_V6),
        &TCP_PORTS,
        &UDP_PORTS,
    )?;
    let conns = connections(&cluster);
    let probes: Vec<Probe> = conns.iter().map(|c| c.probe.clone()).collect();

    // Without policies everything passes: the network works, so a drop below is a verdict.
    let layout = layout(&specs);
    let empty = GeneratedWorld {
        namespaces: vec![],
        pods: random::pods(&layout)
            .new_tree(&mut TestRunner::deterministic())
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .current(),
        policies: vec![],
    };
    cluster
        .install(&empty.world())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let all = vec![true; probes.len()];
    let got = cluster.probe(&probes, &all);
    let failing: Vec<String> = (0..probes.len())
        .filter(|&i| !got[i])
        .map(|i| format!("{:?}", probes[i]))
        .collect();
    ensure!(
        failing.is_empty(),
        "without policies these exchanges fail (the test network is broken):\n{}",
        failing.join("\n")
    );
    let built = started.elapsed();

    let cases = std::env::var("WEFT_DIFFERENTIAL_CASES")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map(|c| if nodes > 1 { c.div_ceil(2) } else { c })
        .unwrap_or(default_cases);
    let rng = match std::env::var("WEFT_DIFFERENTIAL_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(seed) => {
            let mut bytes = [0u8; 32];
            bytes[..8].copy_from_slice(&seed.to_le_bytes());
            TestRng::from_seed(RngAlgorithm::ChaCha, &bytes)
        }
        None => TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    };
    let config = ProptestConfig {
        cases,
        // Each case takes a fraction of a second to a few seconds: shrink a little.
        max_shrink_iters: 24,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let stats = Stats::default();
    let cluster = RefCell::new(cluster);
    let result = runner.run(&random::world(layout), |generated| {
        check(&mut cluster.borrow_mut(), &conns, &generated, &stats)
    });
    eprintln!(
        "{test} ({nodes} node(s)): {} worlds ({} rejected: too many port ranges), {} connections each, \
         {} allowed and {} denied in all; node and warm-up {:.1?}, total {:.1?}",
        stats.worlds.get(),
        stats.rejected.get(),
        conns.len(),
        stats.allowed.get(),
        stats.denied.get(),
        built,
        started.elapsed()
    );
    if let Err(e) = result {
        bail!("{e}");
    }
    Ok(())
}
