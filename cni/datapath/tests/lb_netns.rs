//! NodePort with real sockets: a client in an "outside" namespace, on the node's external
//! link, connects to NodeIP:nodePort; `from_netdev` on the node's side of that link sends it
//! to a pod, `to_netdev` gives the pod's answers NodeIP:nodePort back as their source. Needs
//! root (skips otherwise, fails when CI=true).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use support::{in_ns, ip, Node};
use weft_datapath::nodeport::NodePort;
use weft_datapath::{Datapath, EndpointFlags, Frontend, PolicyMaps, Service, ServiceMaps, L4};

const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 11);
const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 100);

/// The outside namespace, deleted on drop.
struct Outside(String);

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

#[test]
fn nodeport_from_an_outside_namespace() -> Result<()> {
    if !support::require_root("nodeport_from_an_outside_namespace")? {
        return Ok(());
    }
    let node = Node::new("lbnp", 1)?;
    let pod = node.pod(0).clone();
    let outside = Outside(format!("{}-out", node.ns));
    ip(&["netns", "add", &outside.0])?;
    ip(&[
        "-n", &node.ns, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns",
        &outside.0,
    ])?;
    ip(&[
        "-n",
        &node.ns,
        "addr",
        "add",
        "192.168.77.11/24",
        "dev",
        "ext0",
    ])?;
    ip(&["-n", &node.ns, "link", "set", "ext0", "up"])?;
    ip(&[
        "-n",
        &outside.0,
        "addr",
        "add",
        "192.168.77.100/24",
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &outside.0, "link", "set", "eth0", "up"])?;
    ip(&["-n", &outside.0, "link", "set", "lo", "up"])?;

    let mut dp = Datapath::open(&node.pin_dir)?;
    dp.set_endpoint(pod.ifindex, 1, EndpointFlags::NONE)?;
    dp.replace_services(&[
        Service {
            id: 1,
            frontend: Frontend {
                addr: IpAddr::V4(NODE_IP),
                port: 30080,
                proto: L4::Tcp,
            },
            backends: vec![SocketAddr::new(IpAddr::V4(pod.v4), 8080)],
            affinity_timeout_s: None,
            node_port: true,
            remote: Vec::new(),
        },
        Service {
            id: 2,
            frontend: Frontend {
                addr: IpAddr::V4(NODE_IP),
                port: 30081,
                proto: L4::Tcp,
            },
            backends: vec![],
            affinity_timeout_s: None,
            node_port: true,
            remote: Vec::new(),
        },
    ])?;
    let mut nodeport = NodePort::open(&node.pin_dir, None)?;
    node.run(|| -> Result<()> {
        dp.attach(pod.ifindex)?;
        let ext = weft_datapath::if_index("ext0").context("ext0")?;
        nodeport.attach(ext)?;
        // Again: the pinned links are kept, not duplicated.
        nodeport.attach(ext)?;
        Ok(())
    })??;
    let _echo = support::tcp_echo(&pod, 8080)?;

    let to = SocketAddr::new(IpAddr::V4(NODE_IP), 30080);
    let outcome = in_ns(
        &outside.0,
        move || -> std::io::Result<(SocketAddr, SocketAddr)> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            s.write_all(b"hello\n")?;
            let mut buf = [0u8; 6];
            s.read_exact(&mut buf)?;
            Ok((s.local_addr()?, s.peer_addr()?))
        },
    )?;
    let (local, peer) = outcome.context("NodePort connection from outside")?;
    ensure!(peer == to, "answered from {peer}");
    ensure!(local.ip() == IpAddr::V4(OUTSIDE_IP), "{local}");
    let translations = dp.translations()?;
    ensure!(
        translations
            .iter()
            .any(|t| t.client == local && t.frontend == to),
        "the client's address was kept: {translations:?}"
    );

    // No backend: refused at once.
    let empty = SocketAddr::new(IpAddr::V4(NODE_IP), 30081);
    let refused = in_ns(&outside.0, move || {
        TcpStream::connect_timeout(&empty, Duration::from_secs(2)).map(drop)
    })?;
    ensure!(
        matches!(&refused, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    let (ingress, egress) = node.run(|| -> Result<(usize, usize)> {
        use aya::programs::{SchedClassifier, TcAttachType};
        let (_, i) = SchedClassifier::query_tcx("ext0", TcAttachType::Ingress)?;
        let (_, e) = SchedClassifier::query_tcx("ext0", TcAttachType::Egress)?;
        Ok((i.len(), e.len()))
    })??;
    ensure!(
        (ingress, egress) == (1, 1),
        "one program each way: {ingress}/{egress}"
    );
    Ok(())
}
