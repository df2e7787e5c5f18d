//! NodePort through the agent (issue 14): a Service of `type: NodePort` read from the
//! cluster, served on the node's external interface by `weft_nodeport.o`, which the agent
//! attaches at start. Two nodes ([`weft_netns_testing::Cluster`]), the backend on node 1, a
//! client outside the cluster (an address on the fabric).
//!
//! - `externalTrafficPolicy: Local`: node 1's address answers with the client's own address
//!   kept, node 2's (no local endpoint) refuses at once.
//! - `Cluster` (the default), over direct routing and over VXLAN: node 1 still keeps the
//!   client's address (a local backend), node 2 forwards to node 1's pod with source NAT (the
//!   pod sees node 2's address), for new TCP connections, a long-lived one and UDP, whose
//!   answers come back from node 2's NodePort.
//! - The ClusterIP works from a pod on node 2.
//!
//! Needs root:
//!
//! ```sh
//! cargo build -p weft-cni && cargo test -p weft-cni-agent --test nodeport
//! ```

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::{peer_reporter, require_root, seen_by_server, workspace_bin, write_manifest, AGENT};
use weft_netns_testing::{
    udp_echo_ok, Cluster, ClusterPod, ClusterSpec, NodeAgent, TcpEcho, UdpEcho,
};

const NODE_PORT: u16 = 30080;
const ECHO_NODE_PORT: u16 = 30090;
const UDP_NODE_PORT: u16 = 30053;
const CLUSTER_IP: &str = "10.96.88.10";
const CLUSTER_IP_V6: &str = "fd00:96::88:10";
const CLIENT: &str = "192.168.77.200";
const CLIENT_V6: &str = "fd00:77::c8";

/// The Service (`policy`: its externalTrafficPolicy) and, once it runs, the web pod with its
/// EndpointSlice: a peer reporter on 8080, a TCP echo on 9000, a UDP echo on 5353.
fn world(web: Option<&ClusterPod>, policy: &str) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: np}\n");
    let dual = web.is_some_and(|w| w.v6.is_some());
    let ips = if dual {
        format!("clusterIPs: [{CLUSTER_IP}, \"{CLUSTER_IP_V6}\"], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack")
    } else {
        format!("clusterIP: {CLUSTER_IP}")
    };
    out.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: np}}\n\
         spec: {{type: NodePort, externalTrafficPolicy: {policy}, {ips}, \
         selector: {{app: web}},\n  \
         ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}},\n    \
         {{name: echo, port: 9000, targetPort: 9000, nodePort: {ECHO_NODE_PORT}}},\n    \
         {{name: dns, port: 53, protocol: UDP, targetPort: 5353, nodePort: {UDP_NODE_PORT}}}]}}\n"
    ));
    if let Some(web) = web {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: np, labels: {{app: web}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: app, image: x, ports: [{{containerPort: 8080}}]}}]}}\n\
             status: {{podIPs: [{{ip: \"{ip}\"}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: np, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\n\
             ports: [{{name: http, port: 8080}}, {{name: echo, port: 9000}}, {{name: dns, port: 5353, protocol: UDP}}]\n\
             endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}, \
             targetRef: {{kind: Pod, name: web, namespace: np}}}}]\n",
            node = web.node,
            ip = web.v4,
        ));
        if let Some(v6) = web.v6 {
            out.push_str(&format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: web-2, namespace: np, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv6\n\
                 ports: [{{name: http, port: 8080}}, {{name: echo, port: 9000}}, {{name: dns, port: 5353, protocol: UDP}}]\n\
                 endpoints: [{{addresses: [\"{v6}\"], conditions: {{ready: true}}, nodeName: {node}, \
                 targetRef: {{kind: Pod, name: web, namespace: np}}}}]\n",
                node = web.node,
            ));
        }
    }
    out
}

/// Two nodes with agents, the web pod on node 1 (serving), a client pod on node 2, and a
/// client address on the fabric.
struct World {
    cluster: Cluster,
    _manifests: tempfile::TempDir,
    _agents: Vec<NodeAgent>,
    web: ClusterPod,
    client: ClusterPod,
    _servers: (TcpEcho, UdpEcho),
}

fn start(prefix: &str, routing: &str, policy: &str, dual_stack: bool) -> Result<World> {
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let cluster = Cluster::new(ClusterSpec {
        dual_stack,
        ..ClusterSpec::two_nodes(prefix)
    })?;
    cluster
        .fabric
        .ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "br0"])?;
    if dual_stack {
        cluster.fabric.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{CLIENT_V6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
    }
    let manifests = tempfile::tempdir()?;
    write_manifest(manifests.path(), "nodes.yaml", &cluster.nodes_yaml())?;
    write_manifest(manifests.path(), "world.yaml", &world(None, policy))?;
    let args = ["--routing", routing, "--underlay-dev", "eth0"];
    let mut agents = Vec::new();
    for node in &cluster.nodes {
        agents.push(node.spawn_agent(Path::new(AGENT), manifests.path(), &args)?);
    }
    let web = cluster.nodes[0].add_pod(&plugin, ("np", "web"), None)?;
    let client = cluster.nodes[1].add_pod(&plugin, ("np", "client"), None)?;
    // [::] serves both families (IPv4 clients as v4-mapped addresses).
    let any = if dual_stack {
        IpAddr::from([0u16; 8])
    } else {
        IpAddr::V4(web.v4)
    };
    peer_reporter(&web.ns, SocketAddr::new(any, 8080))?;
    let web_ns = web.ns.name.clone();
    let servers = (
        TcpEcho::start(&web_ns, SocketAddr::new(any, 9000))?,
        UdpEcho::start(&web_ns, SocketAddr::new(any, 5353))?,
    );
    write_manifest(manifests.path(), "world.yaml", &world(Some(&web), policy))?;
    Ok(World {
        cluster,
        _manifests: manifests,
        _agents: agents,
        web,
        client,
        _servers: servers,
    })
}

impl World {
    fn node_port(&self, node: usize, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.cluster.nodes[node].underlay_v4), port)
    }

    /// The address the web pod sees for a connection from outside to `node`'s NodePort.
    fn seen_via(&self, node: usize) -> Result<IpAddr> {
        self.seen_at(self.node_port(node, NODE_PORT), Duration::from_secs(3))
    }

    /// The address the web pod sees for a connection from outside to `to`, retried `within`.
    fn seen_at(&self, to: SocketAddr, within: Duration) -> Result<IpAddr> {
        eventually(within, &format!("NodePort {to}"), || {
            seen_by_server(&self.cluster.fabric, to, Duration::from_millis(500))
        })
    }

    /// `n` round trips on one TCP connection from outside to `to`, each translated both ways.
    fn round_trips(&self, to: SocketAddr, n: u32) -> Result<()> {
        self.cluster.fabric.run(move || -> Result<()> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            for i in 0..n {
                let msg = format!("{i:08}");
                s.write_all(msg.as_bytes())?;
                let mut back = [0u8; 8];
                s.read_exact(&mut back)
                    .with_context(|| format!("round trip {i} via {to}"))?;
                ensure!(&back[..] == msg.as_bytes(), "round trip {i}: {back:?}");
            }
            Ok(())
        })?
    }

    /// `n` UDP datagrams from `client` outside to `to`, each answered from `to` itself.
    fn udp_answered(&self, client: IpAddr, to: SocketAddr, n: u32) -> Result<()> {
        let bind = SocketAddr::new(client, 0);
        for i in 0..n {
            let ok = self
                .cluster
                .fabric
                .run(move || udp_echo_ok(bind, to, Duration::from_secs(1)))??;
            ensure!(ok, "UDP datagram {i} was not answered from {to}");
        }
        Ok(())
    }

    /// The ClusterIP from the pod on node 2 reaches the backend on node 1, client kept.
    fn cluster_ip_from_node_2(&self) -> Result<()> {
        let vip = SocketAddr::new(CLUSTER_IP.parse()?, 80);
        let seen = eventually(Duration::from_secs(3), "ClusterIP across nodes", || {
            seen_by_server(&self.client.ns, vip, Duration::from_millis(500))
        })?;
        ensure!(
            seen == IpAddr::V4(self.client.v4),
            "the backend saw {seen}, not {}",
            self.client.v4
        );
        Ok(())
    }
}

/// Retries `f` until it is Ok or `within` passed.
fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => bail!("{what}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn local_keeps_the_client_and_refuses_without_a_local_endpoint() -> Result<()> {
    if !require_root("nodeport_local") {
        return Ok(());
    }
    let w = start("wnp", "direct", "Local", false)?;

    // Node 1 has the endpoint: the outside client is answered, and the pod sees the client's
    // own address.
    let seen = w.seen_via(0)?;
    ensure!(
        seen == CLIENT.parse::<IpAddr>()?,
        "the backend saw {seen}, not the client {CLIENT}"
    );
    for _ in 0..20 {
        let again = seen_by_server(
            &w.cluster.fabric,
            w.node_port(0, NODE_PORT),
            Duration::from_secs(1),
        )?;
        ensure!(again == seen, "{again}");
    }

    // Node 2 has no local endpoint: refused at once (a RST), not a timeout.
    let n2_port = w.node_port(1, NODE_PORT);
    let started = Instant::now();
    let refused = w
        .cluster
        .fabric
        .run(move || TcpStream::connect_timeout(&n2_port, Duration::from_secs(2)))?;
    match refused {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        other => bail!("NodePort on node 2 (no local endpoint): {other:?}, want refused"),
    }
    ensure!(
        started.elapsed() < Duration::from_millis(500),
        "refusal took {:?}",
        started.elapsed()
    );
    w.cluster_ip_from_node_2()
}

/// `externalTrafficPolicy: Cluster` over `routing`: see the module docs.
fn cluster_policy(prefix: &str, routing: &str) -> Result<()> {
    let w = start(prefix, routing, "Cluster", false)?;
    let n2 = w.cluster.nodes[1].underlay_v4;

    // Node 1's own endpoint keeps the client's address, as with Local.
    let seen = w.seen_via(0)?;
    ensure!(
        seen == CLIENT.parse::<IpAddr>()?,
        "via node 1 (local endpoint) the backend saw {seen}, not the client {CLIENT}"
    );

    // Node 2 forwards to node 1's pod with its own address as the source.
    let seen = w.seen_via(1)?;
    ensure!(
        seen == IpAddr::V4(n2),
        "via node 2 the backend saw {seen}, want node 2's address {n2} (source NAT)"
    );
    for i in 0..30 {
        let again = seen_by_server(
            &w.cluster.fabric,
            w.node_port(1, NODE_PORT),
            Duration::from_secs(1),
        )
        .with_context(|| format!("connection {i} via node 2"))?;
        ensure!(again == IpAddr::V4(n2), "connection {i}: {again}");
    }

    // A long-lived connection through node 2: 200 round trips, each both ways translated.
    w.round_trips(w.node_port(1, ECHO_NODE_PORT), 200)?;
    // UDP through node 2: the answer comes back from node 2's NodePort.
    w.udp_answered(CLIENT.parse()?, w.node_port(1, UDP_NODE_PORT), 10)?;
    ensure!(
        w.web.node == w.cluster.nodes[0].name,
        "the backend runs on node 1"
    );
    w.cluster_ip_from_node_2()
}

#[test]
fn cluster_reaches_another_nodes_endpoint_through_snat_direct() -> Result<()> {
    if !require_root("nodeport_cluster_direct") {
        return Ok(());
    }
    cluster_policy("wnc", "direct")
}

#[test]
fn cluster_reaches_another_nodes_endpoint_through_snat_vxlan() -> Result<()> {
    if !require_root("nodeport_cluster_vxlan") {
        return Ok(());
    }
    cluster_policy("wnv", "vxlan")
}

/// IPv6: a dual-stack cluster, the client outside on the fabric's IPv6 address; node 2's
/// IPv6 NodePort forwards to node 1's pod with node 2's IPv6 address as the source (TCP, a
/// long-lived connection and UDP answered from node 2's IPv6 NodePort), node 1's keeps the
/// client's.
#[test]
fn cluster_reaches_another_nodes_endpoint_through_snat_ipv6() -> Result<()> {
    if !require_root("nodeport_cluster_ipv6") {
        return Ok(());
    }
    let w = start("wn6", "direct", "Cluster", true)?;
    let (n1, n2) = (&w.cluster.nodes[0], &w.cluster.nodes[1]);
    let (Some(n1_v6), Some(n2_v6)) = (n1.underlay_v6, n2.underlay_v6) else {
        bail!("a dual-stack cluster without IPv6 underlay addresses");
    };
    ensure!(w.web.v6.is_some(), "the web pod has no IPv6 address");
    let client: IpAddr = CLIENT_V6.parse()?;
    let via = |node: std::net::Ipv6Addr, port: u16| SocketAddr::new(IpAddr::V6(node), port);
    let seen = w.seen_at(via(n1_v6, NODE_PORT), Duration::from_secs(5))?;
    ensure!(
        seen == client,
        "via node 1 the backend saw {seen}, not the client {client}"
    );
    for i in 0..20 {
        let seen = w
            .seen_at(via(n2_v6, NODE_PORT), Duration::from_secs(3))
            .with_context(|| format!("connection {i} via node 2"))?;
        ensure!(
            seen == IpAddr::V6(n2_v6),
            "connection {i} via node 2: the backend saw {seen}, want node 2's {n2_v6}"
        );
    }
    w.round_trips(via(n2_v6, ECHO_NODE_PORT), 100)?;
    w.udp_answered(client, via(n2_v6, UDP_NODE_PORT), 10)?;
    Ok(())
}
