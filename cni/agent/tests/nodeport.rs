//! NodePort through the agent (issue 14): a Service of `type: NodePort` read from the
//! cluster, served on the node's external interface by `weft_nodeport.o`, which the agent
//! attaches at start. Two nodes ([`weft_netns_testing::Cluster`]), the backend on node 1, a
//! client outside the cluster (an address on the fabric): node 1's address answers with the
//! client's own address kept (externalTrafficPolicy Local semantics), node 2's (no local
//! endpoint) refuses at once, and the ClusterIP works from a pod on node 2. Needs root:
//!
//! ```sh
//! cargo build -p weft-cni && cargo test -p weft-cni-agent --test nodeport
//! ```

mod support;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use support::{peer_reporter, require_root, seen_by_server, workspace_bin, write_manifest, AGENT};
use weft_netns_testing::{Cluster, ClusterPod, ClusterSpec};

const NODE_PORT: u16 = 30080;
const CLUSTER_IP: &str = "10.96.88.10";
const CLIENT: &str = "192.168.77.200";

fn world(web: Option<&ClusterPod>) -> String {
    let mut out = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: np}\n");
    out.push_str(&format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: np}}\n\
         spec: {{type: NodePort, clusterIP: {CLUSTER_IP}, selector: {{app: web}},\n  \
         ports: [{{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}]}}\n"
    ));
    if let Some(web) = web {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: web, namespace: np, labels: {{app: web}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: app, image: x, ports: [{{containerPort: 8080}}]}}]}}\n\
             status: {{podIPs: [{{ip: \"{ip}\"}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-1, namespace: np, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [\"{ip}\"], conditions: {{ready: true}}, nodeName: {node}, \
             targetRef: {{kind: Pod, name: web, namespace: np}}}}]\n",
            node = web.node,
            ip = web.v4,
        ));
    }
    out
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
fn nodeport_from_outside_the_cluster_keeps_the_client_and_refuses_without_a_local_endpoint(
) -> Result<()> {
    if !require_root("nodeport_from_outside") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let cluster = Cluster::new(ClusterSpec::two_nodes("wnp"))?;
    // The client: an address on the fabric, outside every node.
    cluster
        .fabric
        .ip(&["addr", "add", &format!("{CLIENT}/24"), "dev", "br0"])?;
    let manifests = tempfile::tempdir()?;
    write_manifest(manifests.path(), "nodes.yaml", &cluster.nodes_yaml())?;
    write_manifest(manifests.path(), "world.yaml", &world(None))?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let args = ["--routing", "direct", "--underlay-dev", "eth0"];
    let _a1 = n1.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    let _a2 = n2.spawn_agent(Path::new(AGENT), manifests.path(), &args)?;
    let web = n1.add_pod(&plugin, ("np", "web"), None)?;
    let client = n2.add_pod(&plugin, ("np", "client"), None)?;
    peer_reporter(&web.ns, SocketAddr::new(IpAddr::V4(web.v4), 8080))?;
    write_manifest(manifests.path(), "world.yaml", &world(Some(&web)))?;

    // Node 1 has the endpoint: the outside client is answered, and the pod sees the client's
    // own address.
    let n1_port = SocketAddr::new(IpAddr::V4(n1.underlay_v4), NODE_PORT);
    let seen = eventually(Duration::from_secs(3), "NodePort on node 1", || {
        seen_by_server(&cluster.fabric, n1_port, Duration::from_millis(500))
    })?;
    ensure!(
        seen == CLIENT.parse::<IpAddr>()?,
        "the backend saw {seen}, not the client {CLIENT}"
    );
    for _ in 0..20 {
        let again = seen_by_server(&cluster.fabric, n1_port, Duration::from_secs(1))?;
        ensure!(again == seen, "{again}");
    }

    // Node 2 has no local endpoint: refused at once (a RST), not a timeout.
    let n2_port = SocketAddr::new(IpAddr::V4(n2.underlay_v4), NODE_PORT);
    let started = Instant::now();
    let refused = cluster
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

    // The ClusterIP from a pod on node 2 reaches the backend on node 1, client kept.
    let vip = SocketAddr::new(CLUSTER_IP.parse()?, 80);
    let seen = eventually(Duration::from_secs(3), "ClusterIP across nodes", || {
        seen_by_server(&client.ns, vip, Duration::from_millis(500))
    })?;
    ensure!(
        seen == IpAddr::V4(client.v4),
        "the backend saw {seen}, not {}",
        client.v4
    );
    Ok(())
}
