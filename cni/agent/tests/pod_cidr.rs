//! `"subnet": "usePodCidr"` end to end: the real plugin, agent and host-local in node
//! namespaces ([`weft_netns_testing::Cluster`]), each agent reading the Node objects from a
//! manifest directory. Needs root; build the plugin first:
//!
//! ```sh
//! cargo build -p weft-cni && cargo test -p weft-cni-agent --test pod_cidr
//! ```
//!
//! - Two dual-stack nodes, one conflist for both (`usePodCidr`, `usePodCidrIPv6`): every
//!   pod's addresses lie in its own node's pod CIDRs (host-local's leases say the same), pods
//!   reach each other across the nodes over IPv4 and IPv6 (the agents route each other
//!   node's pod CIDRs, the ranges the pods were given), DEL releases the lease, also with
//!   the agent stopped.
//! - A node whose Node has no `spec.podCIDRs` yet: ADD fails with code 11 naming the node
//!   and the field, and leaves no lease, interface or route; once the Node gets its pod CIDR
//!   the retried ADD succeeds inside it. With the agent stopped ADD fails naming its socket.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use support::{require_root, workspace_bin, write_manifest, AGENT};
use weft_model::netpol::Cidr;
use weft_netns_testing::{
    cni_env, exec_cni, host_local_leases, Cluster, ClusterNode, ClusterPod, ClusterSpec, Netns,
    TcpEcho,
};

/// host-local's leases on `node` (none before its first allocation).
fn leases(node: &ClusterNode) -> Result<Vec<String>> {
    let dir = node.dir.join("ipam");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut l = host_local_leases(&dir)?;
    l.sort();
    Ok(l)
}

fn inside(cidr: &str, ip: IpAddr) -> Result<bool> {
    Ok(cidr.parse::<Cidr>()?.contains(ip))
}

/// A TCP echo through `to:port` from `from`, retried until `within` (the agents' routes to
/// the other node appear shortly after they start).
fn reaches(from: &ClusterPod, to: IpAddr, port: u16, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let ok = from.ns.run(move || {
            weft_netns_testing::tcp_echo_ok(SocketAddr::new(to, port), Duration::from_millis(500))
        })?;
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{}/{} on {} cannot reach {to}:{port} within {within:?}",
                from.namespace,
                from.name,
                from.node
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One CNI call of `command` for pod `pod` (its namespace at `netns`) on `node` with `conf`:
/// (exit code, stdout).
fn cni(
    node: &ClusterNode,
    plugin: &Path,
    command: &str,
    container_id: &str,
    netns: &str,
    pod: (&str, &str),
    conf: &Value,
) -> Result<(i32, String)> {
    let out = exec_cni(
        &node.ns,
        plugin,
        cni_env(command, container_id, netns, pod),
        &serde_json::to_vec(conf)?,
        Stdio::inherit(),
    )?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The error object of a failed call.
fn error_object(code: i32, stdout: &str) -> Result<Value> {
    ensure!(
        code == 1,
        "expected the call to fail, it exited {code}: {stdout}"
    );
    let o: Value = serde_json::from_str(stdout).context("error object is JSON")?;
    ensure!(
        o["msg"].as_str().is_some_and(|m| !m.is_empty())
            && o["details"].as_str().is_some_and(|d| !d.is_empty()),
        "error object without msg or details: {o}"
    );
    Ok(o)
}

#[test]
fn pods_get_addresses_from_their_own_nodes_pod_cidrs() -> Result<()> {
    if !require_root("pods_get_addresses_from_their_own_nodes_pod_cidrs") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let mut spec = ClusterSpec::two_nodes("wpc");
    spec.dual_stack = true;
    let cluster = Cluster::new(spec)?;
    let manifests = tempfile::tempdir()?;
    write_manifest(manifests.path(), "nodes.yaml", &cluster.nodes_yaml())?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let args = ["--routing", "direct", "--underlay-dev", "eth0"];
    let _a1 = n1.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    let mut a2 = n2.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;

    // The same conflist on both nodes: no subnet in it, only the placeholders.
    let (c1, c2) = (n1.use_pod_cidr(), n2.use_pod_cidr());
    ensure!(
        c1["ipam"]["ranges"] == c2["ipam"]["ranges"],
        "one conflist for every node"
    );
    let a = n1.add_pod(&plugin, ("alpha", "a"), Some(&c1))?;
    let a2nd = n1.add_pod(&plugin, ("alpha", "a2"), Some(&c1))?;
    let b = n2.add_pod(&plugin, ("alpha", "b"), Some(&c2))?;

    for (pod, node) in [(&a, n1), (&a2nd, n1), (&b, n2)] {
        let v6 = pod.v6.context("an IPv6 address (usePodCidrIPv6)")?;
        let cidr6 = node.pod_cidr_v6.as_deref().context("dual stack")?;
        ensure!(
            inside(&node.pod_cidr_v4, pod.v4.into())? && inside(cidr6, v6.into())?,
            "{} got {} and {v6}, outside {}'s pod CIDRs {} and {cidr6}",
            pod.name,
            pod.v4,
            node.name,
            node.pod_cidr_v4
        );
    }
    ensure!(a.v4 != a2nd.v4, "two pods, one address: {}", a.v4);
    // host-local holds exactly these leases on each node.
    let want1: Vec<String> = {
        let mut w: Vec<String> = [&a, &a2nd]
            .iter()
            .flat_map(|p| {
                [
                    p.v4.to_string(),
                    p.v6.map(|v| v.to_string()).unwrap_or_default(),
                ]
            })
            .collect();
        w.sort();
        w
    };
    ensure!(
        leases(n1)? == want1,
        "node-1 leases {:?}, want {want1:?}",
        leases(n1)?
    );
    ensure!(leases(n2)?.len() == 2, "node-2 leases {:?}", leases(n2)?);

    // Across the nodes, both ways, both families: the other node routes exactly the range
    // the pod was given.
    let any6 = SocketAddr::from(([0u16; 8], 8080));
    let _sa = TcpEcho::start(&a.ns.name, any6)?;
    let _sb = TcpEcho::start(&b.ns.name, any6)?;
    let b6 = b.v6.context("b v6")?;
    let a6 = a.v6.context("a v6")?;
    for (from, to) in [
        (&a, IpAddr::V4(b.v4)),
        (&a, IpAddr::V6(b6)),
        (&b, IpAddr::V4(a.v4)),
        (&b, IpAddr::V6(a6)),
        (&a2nd, IpAddr::V4(b.v4)),
    ] {
        reaches(from, to, 8080, Duration::from_secs(5))?;
    }

    // DEL with the same conflist releases the pod's leases.
    let (code, out) = cni(
        n1,
        &plugin,
        "DEL",
        &a2nd.container_id,
        &a2nd.ns.path(),
        ("alpha", "a2"),
        &n1.cni_conf(Some(&c1)),
    )?;
    ensure!(code == 0, "DEL a2: {out}");
    let left = leases(n1)?;
    ensure!(
        !left.contains(&a2nd.v4.to_string()) && left.contains(&a.v4.to_string()),
        "node-1 leases after DEL a2: {left:?}"
    );
    // With node 2's agent gone DEL still releases (host-local gets placeholder ranges).
    a2.stop();
    let (code, out) = cni(
        n2,
        &plugin,
        "DEL",
        &b.container_id,
        &b.ns.path(),
        ("alpha", "b"),
        &n2.cni_conf(Some(&c2)),
    )?;
    ensure!(code == 0, "DEL b with the agent stopped: {out}");
    ensure!(
        leases(n2)?.is_empty(),
        "node-2 leases after DEL: {:?}",
        leases(n2)?
    );
    Ok(())
}

#[test]
fn add_fails_clearly_until_the_node_has_a_pod_cidr() -> Result<()> {
    if !require_root("add_fails_clearly_until_the_node_has_a_pod_cidr") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let mut spec = ClusterSpec::two_nodes("wpc");
    spec.nodes = 1;
    let cluster = Cluster::new(spec)?;
    let n1 = &cluster.nodes[0];
    let manifests = tempfile::tempdir()?;
    // A new node: known, addressed, no pod CIDR assigned yet.
    write_manifest(
        manifests.path(),
        "nodes.yaml",
        &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nstatus: {{addresses: [{{type: InternalIP, address: \"{}\"}}]}}\n",
            n1.name, n1.underlay_v4
        ),
    )?;
    let mut agent = n1.spawn_agent(Path::new(AGENT), manifests.path(), &[])?;
    let conf = n1.cni_conf(Some(&n1.use_pod_cidr()));
    let pod = Netns::named(weft_netns_testing::unique(&n1.ns.name, "p"))?;
    let cid = format!("c-{}", pod.name);
    let key = ("alpha", "p");

    let (code, out) = cni(n1, &plugin, "ADD", &cid, &pod.path(), key, &conf)?;
    let o = error_object(code, &out)?;
    ensure!(o["code"] == 11, "try again later: {o}");
    let msg = o["msg"].as_str().unwrap_or_default();
    for needle in [
        n1.name.as_str(),
        "spec.podCIDRs",
        "usePodCidr",
        "ipam.ranges[0][0].subnet",
    ] {
        ensure!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
    // Nothing was allocated or wired.
    ensure!(
        leases(n1)?.is_empty(),
        "leases after a failed ADD: {:?}",
        leases(n1)?
    );
    ensure!(pod.links()? == ["lo"], "pod links: {:?}", pod.links()?);
    ensure!(
        !n1.ns.links()?.iter().any(|l| l.starts_with("lxc")),
        "host veths: {:?}",
        n1.ns.links()?
    );

    // The node IPAM controller assigns the pod CIDR; the kubelet's retry succeeds, inside it.
    write_manifest(manifests.path(), "nodes.yaml", &cluster.nodes_yaml())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let result = loop {
        let (code, out) = cni(n1, &plugin, "ADD", &cid, &pod.path(), key, &conf)?;
        if code == 0 {
            break out;
        }
        if Instant::now() > deadline {
            bail!("ADD still failing 5 s after the Node got its pod CIDR: {out}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let ip = support::result_ip(&result)?;
    ensure!(
        inside(&n1.pod_cidr_v4, ip)?,
        "{ip} outside {}",
        n1.pod_cidr_v4
    );
    ensure!(leases(n1)? == [ip.to_string()], "leases: {:?}", leases(n1)?);

    // The agent stopped: ADD fails naming its socket, and allocates nothing.
    agent.stop();
    let other = Netns::named(weft_netns_testing::unique(&n1.ns.name, "q"))?;
    let (code, out) = cni(
        n1,
        &plugin,
        "ADD",
        &format!("c-{}", other.name),
        &other.path(),
        ("alpha", "q"),
        &conf,
    )?;
    let o = error_object(code, &out)?;
    ensure!(o["code"] == 11, "try again later: {o}");
    let socket = n1.socket();
    let msg = o["msg"].as_str().unwrap_or_default();
    ensure!(
        msg.contains(socket.to_str().context("utf-8 socket path")?) && msg.contains("usePodCidr"),
        "{msg:?} lacks the socket or usePodCidr"
    );
    ensure!(leases(n1)? == [ip.to_string()], "leases: {:?}", leases(n1)?);
    Ok(())
}
