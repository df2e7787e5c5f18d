//! Pods across nodes: two node namespaces on one underlay bridge
//! ([`weft_netns_testing::Cluster`]), each with its own `weft-cni-agent` and pods added by
//! the real `weft-cni`, routed by the agents from the Node objects: by direct routing and by
//! VXLAN. Needs root; build the plugin first:
//!
//! ```sh
//! cargo build -p weft-cni && cargo test -p weft-cni-agent --test nodes
//! ```
//!
//! Each mode checks: TCP and UDP both ways over IPv4 and IPv6, the server sees the client
//! pod's own address (no NAT), a NetworkPolicy whose podSelector matches a pod on the other
//! node and an ipBlock rule (with an except) enforced across nodes, allowed and denied; the
//! pods' MTU (reduced for VXLAN) and a 1 MiB transfer with DF set; a Node added and removed
//! changes the routes within 1 s; an agent restart adopts its routes without touching them
//! (both agents restarted under traffic: a connection across the nodes keeps echoing);
//! an uninstall (`unpin_all`) leaves no pin. A third test runs VXLAN over an IPv6-only
//! underlay (IPv6 tunnels, MTU 1430).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::{peer_reporter, require_root, seen_by_server, workspace_bin, write_manifest, AGENT};
use weft_netns_testing::{Cluster, ClusterNode, ClusterPod, ClusterSpec, Netns, TcpEcho, UdpEcho};

const ALLOWED: Duration = Duration::from_millis(1500);
const DENIED: Duration = Duration::from_millis(300);

/// The namespace and the three pods (labelled `app: <name>`), with `status.podIPs` once
/// the pods have addresses: what the kubelet reports, and what the *other* node's agent
/// knows a remote pod's address from (its own pods it knows from their ADD).
fn pods_yaml(pods: &[&ClusterPod]) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: alpha}\n");
    for name in ["client", "stranger", "web"] {
        let status = pods
            .iter()
            .find(|p| p.name == name)
            .map(|p| {
                let mut ips = vec![format!("{{ip: \"{}\"}}", p.v4)];
                ips.extend(p.v6.map(|v6| format!("{{ip: \"{v6}\"}}")));
                format!("status: {{podIPs: [{}]}}\n", ips.join(", "))
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: alpha, labels: {{app: {name}}}}}\nspec: {{containers: [{{name: app, image: x}}]}}\n{status}"
        ));
    }
    out
}

/// web (node 2) takes TCP 8080 and UDP 5353 from pods labelled app=client (on node 1), and
/// TCP 9090 from node 1's pod CIDR but the stranger's address.
fn policies(stranger: &ClusterPod) -> String {
    let except = format!("{}/32", stranger.v4);
    let v6 = stranger
        .v6
        .map(|s6| format!("\n  - from: [{{ipBlock: {{cidr: \"fd77:0:1::/64\", except: [\"{s6}/128\"]}}}}]\n    ports: [{{port: 9090}}]"))
        .unwrap_or_default();
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-client, namespace: alpha}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
    ports: [{{port: 8080}}, {{protocol: UDP, port: 5353}}, {{port: 7070}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-node-1, namespace: alpha}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: 10.77.1.0/24, except: [{except}]}}}}]
    ports: [{{port: 9090}}]{v6}
"#
    )
}

fn tcp(from: &ClusterPod, to: IpAddr, port: u16, want: bool, what: &str) -> Result<()> {
    let timeout = if want { ALLOWED } else { DENIED };
    let got = from
        .ns
        .run(move || weft_netns_testing::tcp_echo_ok(SocketAddr::new(to, port), timeout))?;
    ensure!(
        got == want,
        "{what}: TCP {}/{} → {to}:{port} {}, should be {}",
        from.namespace,
        from.name,
        if got { "connected" } else { "failed" },
        if want { "allowed" } else { "denied" }
    );
    Ok(())
}

fn udp(from: &ClusterPod, to: IpAddr, port: u16, want: bool, what: &str) -> Result<()> {
    let timeout = if want { ALLOWED } else { DENIED };
    let bind = SocketAddr::new(
        if to.is_ipv4() {
            IpAddr::from([0u8; 4])
        } else {
            IpAddr::from([0u16; 8])
        },
        0,
    );
    let got = from
        .ns
        .run(move || weft_netns_testing::udp_echo_ok(bind, SocketAddr::new(to, port), timeout))??;
    ensure!(
        got == want,
        "{what}: UDP {}/{} → {to}:{port}: echoed={got}, want {want}",
        from.namespace,
        from.name
    );
    Ok(())
}

/// Sends 1 MiB over TCP with DF set on every packet (IP_PMTUDISC_DO) to a sink that answers
/// with the byte count.
fn transfer_1mib_df(from: &Netns, to: SocketAddr) -> Result<usize> {
    from.run(move || -> Result<usize> {
        let s = TcpStream::connect_timeout(&to, ALLOWED)?;
        let (level, opt) = if to.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_MTU_DISCOVER)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER)
        };
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt on our own socket with a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        ensure!(
            rc == 0,
            "IP_MTU_DISCOVER: {}",
            std::io::Error::last_os_error()
        );
        let mut s = s;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let chunk = vec![0x5au8; 64 * 1024];
        for _ in 0..16 {
            s.write_all(&chunk)?;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer.trim().parse()?)
    })?
}

fn sink(ns: &Netns, addr: SocketAddr) -> Result<u16> {
    let listener = ns.run(move || TcpListener::bind(addr))??;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                let mut n = 0usize;
                let mut buf = vec![0u8; 65536];
                while let Ok(k) = c.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                }
                let _ = c.write_all(n.to_string().as_bytes());
            });
        }
    });
    Ok(port)
}

/// The agent's routes (`proto 87`) in a node, both families, as `ip` prints them.
fn agent_routes(node: &ClusterNode) -> Result<String> {
    Ok(format!(
        "{}{}",
        node.ns.ip(&["route", "show", "proto", "87"])?,
        node.ns.ip(&["-6", "route", "show", "proto", "87"])?
    ))
}

fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cross_node(mode: &str) -> Result<()> {
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let mut spec = ClusterSpec::two_nodes("wrt");
    spec.dual_stack = true;
    let cluster = Cluster::new(spec)?;
    let manifests = tempfile::tempdir()?;
    write_manifest(manifests.path(), "nodes.yaml", &cluster.nodes_yaml())?;
    write_manifest(manifests.path(), "pods.yaml", &pods_yaml(&[]))?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let args = ["--routing", mode, "--underlay-dev", "eth0"];
    let mut a1 = n1.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    let mut a2 = n2.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;

    // Routes to the other node's pod CIDRs, both families.
    for (node, other) in [(n1, n2), (n2, n1)] {
        let want: Vec<String> = match mode {
            "direct" => vec![
                format!("{} via {}", other.pod_cidr_v4, other.underlay_v4),
                format!(
                    "{} via {}",
                    other.pod_cidr_v6.as_deref().context("v6 cidr")?,
                    other.underlay_v6.context("v6 underlay")?
                ),
            ],
            _ => vec![
                format!("{} dev weft_vxlan", other.pod_cidr_v4),
                format!(
                    "{} dev weft_vxlan",
                    other.pod_cidr_v6.as_deref().context("v6 cidr")?
                ),
            ],
        };
        wait_for(
            &format!("routes on {}", node.name),
            Duration::from_secs(5),
            || {
                let routes = agent_routes(node)?;
                Ok(want.iter().all(|w| routes.contains(w.as_str())))
            },
        )
        .with_context(|| format!("{}: {}", node.name, agent_routes(node).unwrap_or_default()))?;
    }

    // The same, as the agent counts it.
    let (_, metrics) = weft_netns_testing::http_get(
        &n1.ns.name,
        SocketAddr::from(([127, 0, 0, 1], 9964)),
        "/metrics",
    )?;
    ensure!(
        support::metric(&metrics, "weft_cni_remote_pod_cidrs") == Some(2.0)
            && support::metric(&metrics, "weft_cni_route_errors_total") == Some(0.0),
        "{mode}: routing metrics:\n{metrics}"
    );

    let client = n1.add_pod(&plugin, ("alpha", "client"), None)?;
    let stranger = n1.add_pod(&plugin, ("alpha", "stranger"), None)?;
    let web = n2.add_pod(&plugin, ("alpha", "web"), None)?;
    write_manifest(
        manifests.path(),
        "pods.yaml",
        &pods_yaml(&[&client, &stranger, &web]),
    )?;
    let (web4, web6) = (IpAddr::V4(web.v4), IpAddr::V6(web.v6.context("web v6")?));
    let (client4, client6) = (
        IpAddr::V4(client.v4),
        IpAddr::V6(client.v6.context("client v6")?),
    );

    // MTU: reduced by the encapsulation, on both veth ends.
    let want_mtu = if mode == "vxlan" { 1450 } else { 1500 };
    ensure!(
        ClusterNode::mtu_of(&client.ns, "eth0")? == want_mtu,
        "client eth0 MTU"
    );
    ensure!(
        ClusterNode::mtu_of(&web.ns, "eth0")? == want_mtu,
        "web eth0 MTU"
    );
    ensure!(
        client.result["interfaces"][1]["mtu"] == want_mtu,
        "ADD result's mtu: {}",
        client.result
    );
    let host_if = client.result["interfaces"][0]["name"]
        .as_str()
        .context("host interface")?
        .to_string();
    ensure!(
        ClusterNode::mtu_of(&n1.ns, &host_if)? == want_mtu,
        "host veth MTU"
    );

    // Servers on both sides, both families.
    let any6 = SocketAddr::from(([0u16; 8], 0));
    let mut servers = Vec::new();
    for (pod, port) in [(&web, 8080), (&web, 9090), (&web, 8081), (&client, 8080)] {
        servers.push(TcpEcho::start(
            &pod.ns.name,
            SocketAddr::new(any6.ip(), port),
        )?);
    }
    let _udp4 = UdpEcho::start(&web.ns.name, SocketAddr::new(web4, 5353))?;
    let _udp6 = UdpEcho::start(&web.ns.name, SocketAddr::new(web6, 5353))?;
    let _udpc = UdpEcho::start(&client.ns.name, SocketAddr::new(client4, 5353))?;

    // Before any policy: both ways, TCP and UDP, IPv4 and IPv6.
    for (to, what) in [(web4, "v4"), (web6, "v6")] {
        tcp(&client, to, 8080, true, &format!("{mode} {what} n1→n2"))?;
        udp(&client, to, 5353, true, &format!("{mode} {what} n1→n2"))?;
    }
    tcp(&web, client4, 8080, true, &format!("{mode} v4 n2→n1"))?;
    tcp(&web, client6, 8080, true, &format!("{mode} v6 n2→n1"))?;
    udp(&web, client4, 5353, true, &format!("{mode} v4 n2→n1"))?;

    // No NAT: the server sees the client pod's own addresses.
    let rport = peer_reporter(&web.ns, SocketAddr::new(any6.ip(), 0))?;
    ensure!(
        seen_by_server(&client.ns, SocketAddr::new(web4, rport), ALLOWED)? == client4,
        "server saw another IPv4 address"
    );
    let seen6 = seen_by_server(&client.ns, SocketAddr::new(web6, rport), ALLOWED)?;
    ensure!(seen6 == client6, "server saw {seen6}, not {client6}");

    // 1 MiB with DF set, over the pods' MTU.
    let sport = sink(&web.ns, SocketAddr::new(any6.ip(), 7070))?;
    ensure!(
        transfer_1mib_df(&client.ns, SocketAddr::new(web4, sport))? == 1 << 20,
        "1 MiB v4"
    );
    ensure!(
        transfer_1mib_df(&client.ns, SocketAddr::new(web6, sport))? == 1 << 20,
        "1 MiB v6"
    );

    // NetworkPolicy across nodes: a podSelector matching node 1's client, an ipBlock of
    // node 1's pod CIDR with the stranger excepted.
    write_manifest(manifests.path(), "policies.yaml", &policies(&stranger))?;
    let took = wait_for("policy enforced", Duration::from_secs(5), || {
        Ok(!stranger
            .ns
            .run(move || weft_netns_testing::tcp_echo_ok(SocketAddr::new(web4, 8080), DENIED))?)
    })?;
    eprintln!("{mode}: cross-node policy enforced {took:?} after the edit");
    for (to, fam) in [(web4, "v4"), (web6, "v6")] {
        let w = |s: &str| format!("{mode} {fam} {s}");
        tcp(
            &client,
            to,
            8080,
            true,
            &w("podSelector on the other node: client"),
        )?;
        udp(&client, to, 5353, true, &w("podSelector UDP: client"))?;
        tcp(&stranger, to, 8080, false, &w("podSelector: stranger"))?;
        udp(&stranger, to, 5353, false, &w("podSelector UDP: stranger"))?;
        tcp(
            &client,
            to,
            9090,
            true,
            &w("ipBlock: client in node 1's CIDR"),
        )?;
        tcp(&stranger, to, 9090, false, &w("ipBlock except: stranger"))?;
        tcp(&client, to, 8081, false, &w("no rule for the port"))?;
    }
    ensure!(
        transfer_1mib_df(&client.ns, SocketAddr::new(web4, sport))? == 1 << 20,
        "1 MiB v4 under policy"
    );
    // The reverse direction is not isolated.
    tcp(
        &web,
        client4,
        8080,
        true,
        &format!("{mode} n2→n1 under policy"),
    )?;

    // A Node added and removed: its routes within 1 s.
    let node9 = "apiVersion: v1\nkind: Node\nmetadata: {name: node-9}\nspec: {podCIDRs: [10.77.9.0/24]}\nstatus: {addresses: [{type: InternalIP, address: 192.168.77.99}]}\n";
    let want9 = if mode == "direct" {
        "10.77.9.0/24 via 192.168.77.99"
    } else {
        "10.77.9.0/24 dev weft_vxlan"
    };
    write_manifest(manifests.path(), "node-9.yaml", node9)?;
    let took = wait_for("node-9's route", Duration::from_secs(1), || {
        Ok(agent_routes(n1)?.contains(want9))
    })?;
    eprintln!("{mode}: a new Node routed after {took:?}");
    std::fs::remove_file(manifests.path().join("node-9.yaml"))?;
    let took = wait_for("node-9's route gone", Duration::from_secs(1), || {
        Ok(!agent_routes(n1)?.contains("10.77.9.0/24"))
    })?;
    eprintln!("{mode}: a removed Node unrouted after {took:?}");

    // Restart: the routes are adopted, not rewritten (a route that is replaced or deleted
    // and added shows up in `ip monitor`); pods keep talking.
    let before = agent_routes(n1)?;
    let mut monitor = n1
        .ns
        .command("ip")?
        .args(["monitor", "route"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("ip monitor")?;
    // Under traffic: a connection across the nodes echoes all through both agents' restart,
    // and a new one connects while they are down.
    let to_web = SocketAddr::new(web4, 8080);
    let mut conn = client
        .ns
        .run(move || TcpStream::connect_timeout(&to_web, ALLOWED))??;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let pinger = std::thread::spawn(move || -> (u64, bool) {
        let mut echoes = 0;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if !weft_netns_testing::echo(&mut conn, ALLOWED) {
                return (echoes, false);
            }
            echoes += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        (echoes, true)
    });
    a1.stop();
    a2.stop();
    tcp(
        &client,
        web4,
        8080,
        true,
        &format!("{mode} with both agents down"),
    )?;
    let a1 = n1.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    let a2 = n2.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (echoes, alive) = pinger
        .join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?;
    ensure!(
        alive && echoes > 10,
        "{mode}: the connection across nodes broke over the restart after {echoes} echoes"
    );
    eprintln!("{mode}: {echoes} echoes across the nodes through both agents' restart");
    tcp(
        &client,
        web4,
        8080,
        true,
        &format!("{mode} after the restart"),
    )?;
    let _ = monitor.kill();
    let out = monitor.wait_with_output()?;
    let events = String::from_utf8_lossy(&out.stdout);
    let ours: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("10.77.2.0") || l.contains("fd77:0:2::"))
        .collect();
    ensure!(ours.is_empty(), "the restart touched the routes: {ours:?}");
    ensure!(
        agent_routes(n1)? == before,
        "routes changed over the restart"
    );

    // An uninstall removes every pin, the overlay's included.
    drop(a1);
    drop(a2);
    for node in [n1, n2] {
        weft_datapath::unpin_all(&node.pin_dir)?;
        ensure!(!node.pin_dir.exists(), "{} left", node.pin_dir.display());
    }
    Ok(())
}

#[test]
fn pods_across_nodes_by_direct_routing() -> Result<()> {
    if !require_root("pods_across_nodes_by_direct_routing") {
        return Ok(());
    }
    cross_node("direct")
}

#[test]
fn pods_across_nodes_by_vxlan() -> Result<()> {
    if !require_root("pods_across_nodes_by_vxlan") {
        return Ok(());
    }
    cross_node("vxlan")
}

/// VXLAN over an IPv6-only underlay: the Nodes' InternalIPs are IPv6, the tunnels too, and
/// the pods get 70 bytes less than the underlay (1430); IPv4 and IPv6 pods both get through,
/// 1 MiB with DF set included.
#[test]
fn pods_across_nodes_by_vxlan_over_an_ipv6_underlay() -> Result<()> {
    if !require_root("pods_across_nodes_by_vxlan_over_an_ipv6_underlay") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let mut spec = ClusterSpec::two_nodes("wrt");
    spec.dual_stack = true;
    let cluster = Cluster::new(spec)?;
    let manifests = tempfile::tempdir()?;
    let mut nodes = Vec::new();
    for node in &cluster.nodes {
        node.ns.ip(&[
            "addr",
            "del",
            &format!("{}/24", node.underlay_v4),
            "dev",
            "eth0",
        ])?;
        let v6 = node.underlay_v6.context("v6 underlay")?;
        nodes.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDRs: [{}, \"{}\"]}}\nstatus: {{addresses: [{{type: InternalIP, address: \"{v6}\"}}]}}\n",
            node.name,
            node.pod_cidr_v4,
            node.pod_cidr_v6.as_deref().context("v6 cidr")?
        ));
    }
    write_manifest(manifests.path(), "nodes.yaml", &nodes.join("---\n"))?;
    write_manifest(manifests.path(), "pods.yaml", &pods_yaml(&[]))?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let args = ["--routing", "vxlan", "--underlay-dev", "eth0"];
    let _a1 = n1.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    let _a2 = n2.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    wait_for(
        "routes over the IPv6 underlay",
        Duration::from_secs(5),
        || {
            let r = agent_routes(n1)?;
            Ok(r.contains("10.77.2.0/24 dev weft_vxlan")
                && r.contains("fd77:0:2::/64 dev weft_vxlan"))
        },
    )?;
    let client = n1.add_pod(&plugin, ("alpha", "client"), None)?;
    let web = n2.add_pod(&plugin, ("alpha", "web"), None)?;
    ensure!(
        ClusterNode::mtu_of(&client.ns, "eth0")? == 1430,
        "client eth0 MTU"
    );
    ensure!(
        ClusterNode::mtu_of(&web.ns, "eth0")? == 1430,
        "web eth0 MTU"
    );
    let any6 = SocketAddr::from(([0u16; 8], 0));
    let _echo_web = TcpEcho::start(&web.ns.name, SocketAddr::new(any6.ip(), 8080))?;
    let _echo_client = TcpEcho::start(&client.ns.name, SocketAddr::new(any6.ip(), 8080))?;
    let sport = sink(&web.ns, any6)?;
    let web6 = IpAddr::V6(web.v6.context("web v6")?);
    for to in [IpAddr::V4(web.v4), web6] {
        tcp(&client, to, 8080, true, "vxlan over IPv6 n1→n2")?;
        ensure!(
            transfer_1mib_df(&client.ns, SocketAddr::new(to, sport))? == 1 << 20,
            "1 MiB with DF to {to}"
        );
    }
    tcp(
        &web,
        IpAddr::V4(client.v4),
        8080,
        true,
        "vxlan over IPv6 n2→n1",
    )?;
    Ok(())
}
