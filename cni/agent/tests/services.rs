//! Services without kube-proxy, end to end: the real `weft-cni-agent` and `weft-cni` on a
//! node namespace, a manifest directory with Services and EndpointSlices, pods as namespaces,
//! real TCP and UDP sockets to ClusterIPs; two nodes; a meshed client (weft-init's rules,
//! weft-proxy, weft-controller) next to a plain one. Needs root; build the binaries first:
//!
//! ```sh
//! cargo build -p weft-cni -p weft-proxy -p weft-controller -p weft-injector
//! cargo test -p weft-cni-agent --test services
//! ```
//!
//! Namespaces are named `wsv-<pid>-<n>-*`.

mod support;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use support::*;
use weft_datapath::{PolicyMaps, ServiceMaps};

const VIP: &str = "10.96.0.10";
const EMPTY_VIP: &str = "10.96.0.11";

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: app, image: x, ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, targetPort: dns, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: sticky, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// The web Service's slice: hand-written without ports, so the named targetPorts are
/// resolved against the pods' container ports. `ready` per endpoint.
fn slice(endpoints: &[(IpAddr, &str, bool)]) -> String {
    let mut out = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
         namespace: shop\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\n\
         endpoints:\n",
    );
    for (ip, pod, ready) in endpoints {
        out.push_str(&format!(
            "- addresses: [\"{ip}\"]\n  conditions: {{ready: {ready}}}\n  targetRef: {{kind: Pod, \
             name: {pod}}}\n"
        ));
    }
    out
}

fn egress_policy(port: u16) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: client-egress, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
  egress:
  - to: [{{podSelector: {{matchLabels: {{app: web}}}}}}]
    ports: [{{port: {port}}}, {{protocol: UDP, port: 5353}}]
"#
    )
}

fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn wsv_ns(tag: &str) -> Result<Netns> {
    Netns::named(weft_netns_testing::unique("wsv", tag))
}

/// A TCP server in a pod that greets every connection with its name (5 bytes) and answers
/// each later read with it again, and a UDP one that answers every datagram with it.
/// Threads end with the process.
fn name_servers(ns: &Netns, name: &'static str) -> Result<()> {
    // [::] takes IPv4 too (v4-mapped), so one server answers both families.
    let any = IpAddr::from([0u16; 8]);
    let tcp = ns.run(move || TcpListener::bind(SocketAddr::new(any, 8080)))??;
    std::thread::spawn(move || {
        for mut s in tcp.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                if s.write_all(name.as_bytes()).is_err() {
                    return;
                }
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {
                    if s.write_all(name.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let udp = ns.run(move || UdpSocket::bind(SocketAddr::new(any, 5353)))??;
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
    Ok(())
}

/// One new TCP connection to `to` from `from`: the backend's name, and the address the
/// client's socket is connected to (its replies came from there).
fn tcp_name(from: &Netns, to: SocketAddr) -> Result<std::io::Result<(String, SocketAddr)>> {
    from.run(move || -> std::io::Result<(String, SocketAddr)> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_millis(500))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut name = [0u8; 5];
        s.read_exact(&mut name)?;
        Ok((String::from_utf8_lossy(&name).into_owned(), s.peer_addr()?))
    })
}

/// One datagram to `to` from a fresh socket: the backend's name and where the answer came
/// from.
fn udp_name(from: &Netns, to: SocketAddr) -> Result<std::io::Result<(String, SocketAddr)>> {
    from.run(move || -> std::io::Result<(String, SocketAddr)> {
        let any = if to.is_ipv6() {
            IpAddr::from([0u16; 8])
        } else {
            IpAddr::from([0, 0, 0, 0])
        };
        let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.send_to(b"who?", to)?;
        let mut buf = [0u8; 64];
        let (n, src) = s.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), src))
    })
}

/// Backend names seen over `n` new TCP connections.
fn spread(from: &Netns, to: SocketAddr, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let (name, peer) =
            tcp_name(from, to)?.with_context(|| format!("connection {i} to {to}"))?;
        ensure!(
            peer == to,
            "the client's socket is connected to {peer}, not {to}"
        );
        *seen.entry(name).or_insert(0) += 1;
    }
    Ok(seen)
}

/// Polls the pinned frontend table until `vip:port/TCP` has `n` backends; the time it took.
fn wait_backends(
    pins: &Path,
    vip: IpAddr,
    port: u16,
    n: usize,
    since: Instant,
) -> Result<Duration> {
    let dp = weft_datapath::Datapath::open(pins)?;
    let deadline = since + Duration::from_secs(5);
    loop {
        let services = dp.services()?;
        let now = services
            .iter()
            .find(|s| s.frontend.addr == vip && s.frontend.port == port)
            .map(|s| s.backends.len());
        if now == Some(n) {
            return Ok(since.elapsed());
        }
        if Instant::now() > deadline {
            bail!("{vip}:{port} still has {now:?} backends, want {n}: {services:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn cluster_ips_balance_refuse_follow_endpoints_and_keep_policy() -> Result<()> {
    if !require_root("cluster_ips") {
        return Ok(());
    }
    let mut world = Node::start(&[("pods.yaml", PODS)], "10.78.0.0/24")?;
    let (node, plugin, conf) = (&world.node, &world.plugin, &world.conf);
    let (manifests, pins, dirs) = (&world.manifests, &world.pins, &world.dirs);

    let client = add_pod(node, plugin, conf, ("shop", "client"))?;
    let a = add_pod(node, plugin, conf, ("shop", "web-a"))?;
    let b = add_pod(node, plugin, conf, ("shop", "web-b"))?;
    name_servers(&a.ns, "web-a")?;
    name_servers(&b.ns, "web-b")?;
    let vip: IpAddr = VIP.parse()?;
    let http = SocketAddr::new(vip, 80);
    let dns = SocketAddr::new(vip, 53);

    // Both endpoints ready: TCP and UDP to the ClusterIP spread over both, answered from it.
    let since = Instant::now();
    write_manifest(
        manifests,
        "slices.yaml",
        &slice(&[(a.ip, "web-a", true), (b.ip, "web-b", true)]),
    )?;
    let took = wait_backends(&pins.0, vip, 80, 2, since)?;
    eprintln!("endpoints in the maps {took:?} after the manifest was written");
    let seen = spread(&client.ns, http, 40)?;
    eprintln!("TCP {http}: {seen:?}");
    ensure!(seen.len() == 2, "both backends answer over TCP: {seen:?}");
    let mut udp_seen = BTreeMap::new();
    for i in 0..40 {
        let (name, src) = udp_name(&client.ns, dns)?.with_context(|| format!("datagram {i}"))?;
        ensure!(
            src == dns,
            "the UDP answer came from {src}, not the ClusterIP {dns}"
        );
        *udp_seen.entry(name).or_insert(0) += 1;
    }
    eprintln!("UDP {dns}: {udp_seen:?}");
    ensure!(
        udp_seen.len() == 2,
        "both backends answer over UDP: {udp_seen:?}"
    );

    // sessionAffinity ClientIP: every new connection of the client goes to one backend.
    write_manifest(
        manifests,
        "sticky.yaml",
        &slice(&[(a.ip, "web-a", true), (b.ip, "web-b", true)])
            .replace("name: web-1", "name: sticky-1")
            .replace("service-name: web}", "service-name: sticky}"),
    )?;
    let sticky_vip: IpAddr = "10.96.0.12".parse()?;
    wait_backends(&pins.0, sticky_vip, 80, 2, Instant::now())?;
    let sticky = spread(&client.ns, SocketAddr::new(sticky_vip, 80), 30)?;
    eprintln!("sessionAffinity ClientIP {sticky_vip}:80: {sticky:?}");
    ensure!(sticky.len() == 1, "one backend for the client: {sticky:?}");

    // No endpoints: refused at once, TCP and UDP, never a timeout.
    let empty: IpAddr = EMPTY_VIP.parse()?;
    let start = Instant::now();
    match tcp_name(&client.ns, SocketAddr::new(empty, 80))? {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => bail!("TCP to a Service without endpoints: {other:?}"),
    }
    let refused_in = start.elapsed();
    eprintln!("TCP to {EMPTY_VIP}:80 (no endpoints) refused in {refused_in:?}");
    ensure!(refused_in < Duration::from_millis(200), "refused quickly");
    let udp_refused = client.ns.run(move || -> std::io::Result<ErrorKind> {
        let s = UdpSocket::bind(SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0))?;
        s.connect(SocketAddr::new(empty, 53))?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.send(b"anyone?")?;
        let mut buf = [0u8; 8];
        Ok(s.recv(&mut buf)
            .map(|_| ErrorKind::Other)
            .unwrap_or_else(|e| e.kind()))
    })??;
    ensure!(
        udp_refused == ErrorKind::ConnectionRefused,
        "UDP to a Service without endpoints: {udp_refused:?}"
    );

    // A connection held open through endpoint changes and an agent restart.
    let mut held = client
        .ns
        .run(move || TcpStream::connect_timeout(&http, Duration::from_secs(1)))??;
    held.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut held_name = [0u8; 5];
    held.read_exact(&mut held_name)?;

    // web-b not ready: new connections go to web-a only, within 1 s.
    let since = Instant::now();
    write_manifest(
        manifests,
        "slices.yaml",
        &slice(&[(a.ip, "web-a", true), (b.ip, "web-b", false)]),
    )?;
    let took = wait_backends(&pins.0, vip, 80, 1, since)?;
    eprintln!("endpoint removed: in the maps {took:?} after the manifest was written");
    ensure!(took < Duration::from_secs(1), "applied within 1 s");
    let seen = spread(&client.ns, http, 20)?;
    ensure!(
        seen.keys().map(String::as_str).collect::<Vec<_>>() == ["web-a"],
        "{seen:?}"
    );
    // And back.
    let since = Instant::now();
    write_manifest(
        manifests,
        "slices.yaml",
        &slice(&[(a.ip, "web-a", true), (b.ip, "web-b", true)]),
    )?;
    let took = wait_backends(&pins.0, vip, 80, 2, since)?;
    eprintln!("endpoint added: in the maps {took:?} after the manifest was written");
    ensure!(took < Duration::from_secs(1), "applied within 1 s");
    ensure!(spread(&client.ns, http, 40)?.len() == 2, "both again");

    // Egress policy is judged on the backend: allowing the web pods' 8080 lets
    // ClusterIP:80 through; allowing only their 9999 does not.
    write_manifest(manifests, "policy.yaml", &egress_policy(8080))?;
    let dp = weft_datapath::Datapath::open(&pins.0)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !dp.endpoints()?.values().any(|e| e.flags.bits() != 0) {
        ensure!(Instant::now() < deadline, "the egress policy never applied");
        std::thread::sleep(Duration::from_millis(10));
    }
    ensure!(
        spread(&client.ns, http, 10)?.len() == 2,
        "allowed: the backends' port 8080"
    );
    write_manifest(manifests, "policy.yaml", &egress_policy(9999))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tcp_name(&client.ns, http)? {
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => break,
            Err(e) => bail!("denied egress: expected a timeout (dropped), got {e}"),
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(_) => bail!("egress to the backends' 8080 is no longer allowed, yet connected"),
        }
    }
    std::fs::remove_file(manifests.join("policy.yaml"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while dp.endpoints()?.values().any(|e| e.flags.bits() != 0) {
        ensure!(Instant::now() < deadline, "the egress policy never went");
        std::thread::sleep(Duration::from_millis(10));
    }

    // An agent restart adopts the pinned services: the held connection keeps its backend,
    // new connections are balanced with the agent down and after it is back.
    world.agent.stop();
    ensure!(
        spread(&client.ns, http, 20)?.len() == 2,
        "balanced with the agent down"
    );
    let agent = Agent::start(node, dirs)?;
    held.write_all(b"still there?")?;
    let mut again = [0u8; 5];
    held.read_exact(&mut again)?;
    ensure!(
        again == held_name,
        "the held connection moved from {} to {}",
        String::from_utf8_lossy(&held_name),
        String::from_utf8_lossy(&again)
    );
    ensure!(
        spread(&client.ns, http, 20)?.len() == 2,
        "balanced after the restart"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent
        .log_text()
        .contains("adopted the pinned service frontends")
    {
        ensure!(
            Instant::now() < deadline,
            "the new agent did not adopt the pinned frontends:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, text) = http_get(node, IpAddr::from([127, 0, 0, 1]), "/metrics")?;
        ensure!(code == 200, "/metrics: {code}");
        // web TCP + UDP, lonely TCP + UDP, sticky TCP; two backends on web's and sticky's.
        if metric(&text, "weft_cni_service_frontends") == Some(5.0)
            && metric(&text, "weft_cni_service_backends") == Some(6.0)
        {
            break;
        }
        ensure!(Instant::now() < deadline, "service gauges:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

const TWO_NODE_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]
"#;

/// Across nodes: a client on node-1 reaches a ClusterIP whose backends are one pod on its
/// own node and one on node-2 (plain routes between the nodes' pod CIDRs, no NAT on the
/// way), TCP and UDP, answered from the ClusterIP; and a client on node-2 too.
#[test]
fn cluster_ips_across_two_nodes() -> Result<()> {
    if !require_root("cluster_ips_across_two_nodes") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let agent_bin = Path::new(AGENT);
    let cluster =
        weft_netns_testing::Cluster::new(weft_netns_testing::ClusterSpec::two_nodes("wsv"))?;
    // Routes between the nodes' pod CIDRs: the baseline's, so that this test is about
    // Services (the agents get no Node objects and route nothing themselves).
    cluster.static_routes()?;
    let tmp = tempfile::tempdir()?;
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    write_manifest(&manifests, "pods.yaml", TWO_NODE_PODS)?;
    let (n1, n2) = (&cluster.nodes[0], &cluster.nodes[1]);
    let _agents = [
        n1.spawn_agent(agent_bin, &manifests, &[])?,
        n2.spawn_agent(agent_bin, &manifests, &[])?,
    ];
    let client1 = n1.add_pod(&plugin, ("shop", "client-1"), None)?;
    let client2 = n2.add_pod(&plugin, ("shop", "client-2"), None)?;
    let a = n1.add_pod(&plugin, ("shop", "web-a"), None)?;
    let b = n2.add_pod(&plugin, ("shop", "web-b"), None)?;
    name_servers(&a.ns, "web-a")?;
    name_servers(&b.ns, "web-b")?;
    let slices = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  \
         namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\n\
         endpoints:\n- addresses: [\"{}\"]\n- addresses: [\"{}\"]\n",
        a.v4, b.v4
    );
    let vip: IpAddr = "10.96.0.20".parse()?;
    let since = Instant::now();
    write_manifest(&manifests, "slices.yaml", &slices)?;
    for node in [n1, n2] {
        let took = wait_backends(&node.pin_dir, vip, 80, 2, since)?;
        eprintln!("{}: endpoints in the maps after {took:?}", node.name);
    }
    let http = SocketAddr::new(vip, 80);
    let dns = SocketAddr::new(vip, 53);
    for client in [&client1, &client2] {
        let ns = &client.ns;
        let seen = spread(ns, http, 30)?;
        eprintln!("{} → {http}: {seen:?}", client.name);
        ensure!(
            seen.len() == 2,
            "{}: the local and the remote backend answer: {seen:?}",
            client.name
        );
        let mut udp_seen = BTreeMap::new();
        for i in 0..30 {
            let (name, src) = udp_name(ns, dns)?.with_context(|| format!("datagram {i}"))?;
            ensure!(src == dns, "UDP answer from {src}, not {dns}");
            *udp_seen.entry(name).or_insert(0) += 1;
        }
        ensure!(udp_seen.len() == 2, "{}: UDP {udp_seen:?}", client.name);
    }
    Ok(())
}

const MESH_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: shop, labels: {app: plain}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: meshed, namespace: shop, labels: {app: meshed}, annotations: {weft.dev/inject: enabled}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec: {containers: [{name: app, image: x, ports: [{name: echo, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, labels: {app: web}}
spec: {containers: [{name: app, image: x, ports: [{name: echo, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  selector: {app: web}
  ports: [{name: echo, port: 80, targetPort: echo}]
"#;

/// A child process killed on drop (its output in `log`).
struct Proc {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn spawn_logged(mut cmd: std::process::Command, log: std::path::PathBuf) -> Result<Proc> {
    let file = std::fs::File::create(&log)?;
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    Ok(Proc { child, log })
}

fn wait_http_ok(ns: &Netns, addr: SocketAddr, path: &str, what: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok((200, _)) = weft_netns_testing::http_get(&ns.name, addr, path) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what} not ready at {addr}{path}:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One connection to `to` that speaks first (as a proxy's protocol detection wants): the
/// backend's name.
fn tcp_name_client_first(from: &Netns, to: SocketAddr) -> Result<std::io::Result<String>> {
    from.run(move || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"hello, who is there?\n")?;
        let mut name = [0u8; 5];
        s.read_exact(&mut name)?;
        Ok(String::from_utf8_lossy(&name).into_owned())
    })
}

/// Meshed pods keep working: to the same Service, a meshed client's connection goes to its
/// sidecar (weft-init's REDIRECT inside the pod) which sees the ClusterIP as the original
/// destination and balances over the endpoints it resolves from weft-controller, connecting
/// to pod addresses (no eBPF translation for that pod); a plain client's connection is
/// balanced by the eBPF datapath.
#[test]
fn a_meshed_client_is_routed_by_its_proxy_and_a_plain_one_by_ebpf() -> Result<()> {
    if !require_root("meshed_and_plain_clients") {
        return Ok(());
    }
    let proxy = workspace_bin("weft-proxy", "weft-proxy");
    let controller = workspace_bin("weft-controller", "weft-controller");
    let init = workspace_bin("weft-init", "weft-injector");
    let world = Node::start(&[("pods.yaml", MESH_PODS)], "10.79.0.0/24")?;
    let (node, plugin, conf) = (&world.node, &world.plugin, &world.conf);
    let (manifests, pins, tmp) = (&world.manifests, &world.pins, &world.tmp);
    let plain = add_pod(node, plugin, conf, ("shop", "plain"))?;
    let meshed = add_pod(node, plugin, conf, ("shop", "meshed"))?;
    let a = add_pod(node, plugin, conf, ("shop", "web-a"))?;
    let b = add_pod(node, plugin, conf, ("shop", "web-b"))?;
    name_servers(&a.ns, "web-a")?;
    name_servers(&b.ns, "web-b")?;
    write_manifest(
        manifests,
        "slices.yaml",
        &slice(&[(a.ip, "web-a", true), (b.ip, "web-b", true)]).replace(
            "addressType: IPv4\n",
            "addressType: IPv4\nports: [{name: echo, port: 8080}]\n",
        ),
    )?;
    let vip: IpAddr = "10.96.0.30".parse()?;
    let to = SocketAddr::new(vip, 80);
    wait_backends(&pins.0, vip, 80, 2, Instant::now())?;

    // The controller on the node (pods reach it at the node's address), plaintext.
    let mut cmd = node.command(&controller)?;
    cmd.args([
        "--source",
        &format!("dir:{}", manifests.display()),
        "--destination-addr",
        "0.0.0.0:8086",
        "--identity-addr",
        "127.0.0.1:8080",
        "--admin-addr",
        "127.0.0.1:9990",
        "--insecure-plaintext",
    ])
    .env("WEFT_CONTROLLER_LOG", "warn");
    let controller_log = tmp.path().join("controller.log");
    let _controller = spawn_logged(cmd, controller_log.clone())?;
    wait_http_ok(
        node,
        "127.0.0.1:9990".parse()?,
        "/ready",
        "weft-controller",
        &controller_log,
    )?;

    // The meshed pod: weft-init's rules, and weft-proxy as UID 2102 with discovery.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &meshed.ns.name])
        .arg(&init)
        .output()?;
    ensure!(
        out.status.success(),
        "weft-init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = meshed.ns.command("setpriv")?;
    cmd.args(["--reuid=2102", "--regid=2102", "--clear-groups"])
        .arg(&proxy)
        .env("WEFT_PROXY_LOG", "warn,weft=info")
        .env("WEFT_PROXY_DESTINATION_ADDR", "http://10.250.0.1:8086")
        .env("WEFT_PROXY_NAMESPACE", "shop")
        .env("WEFT_PROXY_POD_NAME", "meshed")
        .env("WEFT_PROXY_SERVICE_ACCOUNT", "default");
    let proxy_log = tmp.path().join("proxy.log");
    let _proxy = spawn_logged(cmd, proxy_log.clone())?;
    wait_http_ok(
        &meshed.ns,
        "127.0.0.1:4191".parse()?,
        "/ready",
        "weft-proxy",
        &proxy_log,
    )?;

    // Both clients reach both backends through the ClusterIP.
    let dp = weft_datapath::Datapath::open(&pins.0)?;
    let mut seen = BTreeMap::new();
    for i in 0..20 {
        let name = tcp_name_client_first(&meshed.ns, to)?
            .with_context(|| format!("meshed connection {i}"))?;
        *seen.entry(name).or_insert(0) += 1;
    }
    eprintln!("meshed client → {to}: {seen:?}");
    ensure!(seen.len() == 2, "the proxy balances over both: {seen:?}");
    let plain_seen = spread(&plain.ns, to, 20)?;
    eprintln!("plain client → {to}: {plain_seen:?}");
    ensure!(
        plain_seen.len() == 2,
        "eBPF balances over both: {plain_seen:?}"
    );

    // Who translated what: the plain client's connections are eBPF translations; the meshed
    // client's never are (its proxy connected to the pods themselves).
    let translations = dp.translations()?;
    let from = |ip: IpAddr| translations.iter().filter(|t| t.client.ip() == ip).count();
    eprintln!(
        "eBPF translations: plain {}, meshed {}",
        from(plain.ip),
        from(meshed.ip)
    );
    ensure!(from(plain.ip) >= 20, "{translations:?}");
    ensure!(from(meshed.ip) == 0, "{translations:?}");
    // And the proxy took the ClusterIP as the original destination, resolved it through the
    // controller (one target, its two endpoints) and balanced every connection itself
    // instead of passing it through to the ClusterIP.
    let (code, metrics) =
        weft_netns_testing::http_get(&meshed.ns.name, "127.0.0.1:4191".parse()?, "/metrics")?;
    ensure!(code == 200, "proxy /metrics: {code}");
    let series = |s: &str| metric(&metrics, s);
    eprintln!(
        "proxy: resolutions {:?}, endpoints {:?}, balanced {:?}, passthrough {:?}",
        series("weft_discovery_resolutions"),
        series("weft_balancer_endpoints"),
        series("weft_outbound_routes_total{protocol=\"tcp\",route=\"balanced\"}"),
        series("weft_outbound_routes_total{protocol=\"tcp\",route=\"passthrough\"}"),
    );
    ensure!(
        series("weft_discovery_resolutions") == Some(1.0)
            && series("weft_balancer_endpoints") == Some(2.0)
            && series("weft_outbound_routes_total{protocol=\"tcp\",route=\"balanced\"}")
                == Some(20.0)
            && series("weft_outbound_routes_total{protocol=\"tcp\",route=\"passthrough\"}")
                == Some(0.0),
        "the proxy balanced the ClusterIP's connections itself:\n{metrics}"
    );
    Ok(())
}

const DUAL_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.40, "fd00:96::40"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, targetPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: lonely, namespace: shop}
spec:
  clusterIPs: [10.96.0.41, "fd00:96::41"]
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

/// The pod's addresses from an ADD result (IPv4 first).
fn result_ips(result: &str) -> Result<Vec<IpAddr>> {
    let v: Value = serde_json::from_str(result)?;
    Ok(v["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect())
}

/// The plugin configuration of a dual-stack node: host-local over `v4` and `v6`.
fn dual_stack_conf(world: &Node, v4: &str, v6: &str) -> Value {
    let ipam = serde_json::json!({"type": "host-local", "dataDir": world.hl.dir.path(),
        "ranges": [[{"subnet": v4}], [{"subnet": v6}]]});
    plugin_conf(&world.dirs.socket, ipam)
}

/// ADDs pod `shop/name` with `conf` (dual stack): its namespace and addresses, IPv4 first.
fn add_dual_stack_pod(world: &Node, conf: &Value, name: &str) -> Result<(Netns, Vec<IpAddr>)> {
    let ns = wsv_ns(name)?;
    let cid = weft_netns_testing::unique("wsv", name);
    let (code, out) = cni(
        &world.node,
        &world.plugin,
        "ADD",
        &cid,
        &ns.path(),
        ("shop", name),
        conf,
    )?;
    ensure!(code == 0, "ADD {name}: {out}");
    let ips = result_ips(&out)?;
    ensure!(ips.len() == 2 && ips[1].is_ipv6(), "{name}: {ips:?}");
    Ok((ns, ips))
}

/// Service `shop/service`'s two EndpointSlices (IPv4, IPv6), one endpoint each at `ips`,
/// with `ports` (a YAML flow sequence, or empty for none).
fn one_endpoint_slices(service: &str, ports: &str, ips: &[IpAddr]) -> String {
    let slice = |kind: &str, ip: &IpAddr| {
        let ports = if ports.is_empty() {
            String::new()
        } else {
            format!("ports: {ports}\n")
        };
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{kind}\n  \
             namespace: shop\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: {kind}\n\
             {ports}endpoints:\n- addresses: [\"{ip}\"]\n"
        )
    };
    format!("{}---\n{}", slice("IPv4", &ips[0]), slice("IPv6", &ips[1]))
}

/// Dual stack: a Service with an IPv4 and an IPv6 ClusterIP and a slice per family; IPv6
/// connections are translated, answered from the IPv6 ClusterIP and refused (ICMPv6) when
/// there is no endpoint, like IPv4 ones.
#[test]
fn dual_stack_cluster_ips() -> Result<()> {
    if !require_root("dual_stack_cluster_ips") {
        return Ok(());
    }
    let world = Node::start(&[("pods.yaml", DUAL_PODS)], "10.84.0.0/24")?;
    let (manifests, pins) = (&world.manifests, &world.pins);
    let conf = dual_stack_conf(&world, "10.84.0.0/24", "fd00:84::/64");
    let mut pods = Vec::new();
    for name in ["client", "web-a", "web-b"] {
        pods.push(add_dual_stack_pod(&world, &conf, name)?);
    }
    name_servers(&pods[1].0, "web-a")?;
    name_servers(&pods[2].0, "web-b")?;
    let slice_of = |family: usize, kind: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-{kind}\n  \
             namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\naddressType: {kind}\n\
             endpoints:\n- addresses: [\"{}\"]\n- addresses: [\"{}\"]\n",
            pods[1].1[family], pods[2].1[family]
        )
    };
    write_manifest(
        manifests,
        "slices.yaml",
        &format!("{}---\n{}", slice_of(0, "IPv4"), slice_of(1, "IPv6")),
    )?;
    let (vip4, vip6): (IpAddr, IpAddr) = ("10.96.0.40".parse()?, "fd00:96::40".parse()?);
    wait_backends(&pins.0, vip4, 80, 2, Instant::now())?;
    wait_backends(&pins.0, vip6, 80, 2, Instant::now())?;
    let client = &pods[0].0;
    let http6 = SocketAddr::new(vip6, 80);
    // The first IPv6 connection waits for the addresses to leave DAD.
    let direct = SocketAddr::new(pods[1].1[1], 8080);
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = tcp_name(client, direct)? {
        ensure!(
            Instant::now() < deadline,
            "no IPv6 connection to the pod {direct}: {e}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcp_name(client, http6)?.is_err() {
        ensure!(Instant::now() < deadline, "no IPv6 connection to {http6}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = spread(client, http6, 30)?;
    eprintln!("TCP {http6}: {seen:?}");
    ensure!(seen.len() == 2, "both backends over IPv6: {seen:?}");
    let dns6 = SocketAddr::new(vip6, 53);
    let mut udp_seen = BTreeMap::new();
    for i in 0..30 {
        let (name, src) = udp_name(client, dns6)?.with_context(|| format!("datagram {i}"))?;
        ensure!(src == dns6, "UDP answer from {src}, not {dns6}");
        *udp_seen.entry(name).or_insert(0) += 1;
    }
    ensure!(udp_seen.len() == 2, "UDP over IPv6: {udp_seen:?}");
    let seen4 = spread(client, SocketAddr::new(vip4, 80), 20)?;
    ensure!(seen4.len() == 2, "and IPv4: {seen4:?}");
    let lonely6 = SocketAddr::new("fd00:96::41".parse()?, 80);
    let start = Instant::now();
    match tcp_name(client, lonely6)? {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => {
            let dp = weft_datapath::Datapath::open(&pins.0)?;
            bail!(
                "TCP to an IPv6 ClusterIP without endpoints: {other:?}\nfrontends: {:?}\nstats: {:?}",
                dp.services()?,
                dp.service_stats()?
            )
        }
    }
    eprintln!(
        "TCP to {lonely6} (no endpoints) refused in {:?}",
        start.elapsed()
    );
    Ok(())
}

const HAIRPIN_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.42, "fd00:96::42"]
  ipFamilies: [IPv4, IPv6]
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: who, port: 9000, targetPort: 9000}
  - {name: dns, port: 53, targetPort: 5353, protocol: UDP}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
"#;

/// Isolates the web pod: no ingress from anyone.
const DENY_WEB_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-deny-all, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
"#;

/// Hairpin: a pod that is its Service's only endpoint reaches itself through the ClusterIP,
/// over IPv4 and IPv6, TCP and UDP: answered from the ClusterIP, and the server sees the
/// hairpin address (169.254.42.1 / fd77::a9fe:2a01), not its own (whose answer would never
/// leave the pod to be translated back). Also once a policy denies the pod all ingress
/// (which another pod's connection shows): a pod reaching itself is not judged by policy.
#[test]
fn a_pod_reaches_itself_through_its_cluster_ip() -> Result<()> {
    if !require_root("hairpin") {
        return Ok(());
    }
    let world = Node::start(&[("pods.yaml", HAIRPIN_PODS)], "10.85.0.0/24")?;
    let conf = dual_stack_conf(&world, "10.85.0.0/24", "fd00:85::/64");
    let (ns, ips) = add_dual_stack_pod(&world, &conf, "web-a")?;
    name_servers(&ns, "web-a")?;
    peer_reporter(&ns, SocketAddr::new(IpAddr::from([0u16; 8]), 9000))?;
    write_manifest(
        &world.manifests,
        "slices.yaml",
        &one_endpoint_slices("web", "", &ips),
    )?;
    for (vip, hairpin) in [
        (
            "10.96.0.42".parse::<IpAddr>()?,
            IpAddr::V4(weft_datapath::abi::HAIRPIN_V4),
        ),
        (
            "fd00:96::42".parse::<IpAddr>()?,
            IpAddr::V6(weft_datapath::abi::HAIRPIN_V6),
        ),
    ] {
        wait_backends(&world.pins.0, vip, 80, 1, Instant::now())?;
        let http = SocketAddr::new(vip, 80);
        // IPv6 addresses leave DAD first.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (name, peer) = loop {
            match tcp_name(&ns, http)? {
                Ok(v) => break v,
                Err(e) if Instant::now() > deadline => bail!("hairpin TCP to {http}: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        ensure!(name == "web-a" && peer == http, "{name} from {peer}");
        // Several connections, each answered from the ClusterIP.
        let seen = spread(&ns, http, 10)?;
        ensure!(seen.get("web-a") == Some(&10), "{seen:?}");
        let seen = seen_by_server(&ns, SocketAddr::new(vip, 9000), Duration::from_secs(2))?;
        ensure!(
            seen == hairpin,
            "via {vip} the pod saw itself as {seen}, want the hairpin address {hairpin}"
        );
        let dns = SocketAddr::new(vip, 53);
        for i in 0..5 {
            let (name, src) = udp_name(&ns, dns)?.with_context(|| format!("datagram {i}"))?;
            ensure!(
                name == "web-a" && src == dns,
                "UDP: {name} from {src}, not {dns}"
            );
        }
    }

    // Isolate the web pod: another pod is refused from now on, the pod itself is not.
    let (other, _) = add_dual_stack_pod(&world, &conf, "client")?;
    let vip4: IpAddr = "10.96.0.42".parse()?;
    ensure!(
        tcp_name(&other, SocketAddr::new(vip4, 80))?.is_ok(),
        "the client reaches web before the policy"
    );
    write_manifest(&world.manifests, "policy.yaml", DENY_WEB_INGRESS)?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while tcp_name(&other, SocketAddr::new(vip4, 80))?.is_ok() {
        ensure!(
            Instant::now() < deadline,
            "the deny-all policy never applied to the client"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for vip in ["10.96.0.42", "fd00:96::42"] {
        let http = SocketAddr::new(vip.parse()?, 80);
        let (name, peer) = tcp_name(&ns, http)?
            .with_context(|| format!("hairpin to {http} under the deny-all policy"))?;
        ensure!(name == "web-a" && peer == http, "{name} from {peer}");
    }
    Ok(())
}

const MUTE_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Service
metadata: {name: mute, namespace: shop}
spec:
  clusterIPs: [10.96.0.43, "fd00:96::43"]
  ipFamilies: [IPv4, IPv6]
  ports: [{name: dns, port: 53, targetPort: 5399, protocol: UDP}]
"#;

/// ICMP errors about a translated connection reach the client's socket: a UDP socket
/// connected to a ClusterIP whose backend has nothing on the target port gets the backend's
/// port unreachable as ECONNREFUSED (the error's embedded packet and source are given the
/// ClusterIP back; without that the client only times out), over IPv4 and IPv6.
#[test]
fn a_backends_icmp_error_reaches_the_client_as_the_cluster_ips() -> Result<()> {
    if !require_root("icmp_errors") {
        return Ok(());
    }
    let world = Node::start(&[("pods.yaml", MUTE_PODS)], "10.86.0.0/24")?;
    let conf = dual_stack_conf(&world, "10.86.0.0/24", "fd00:86::/64");
    let (client, _) = add_dual_stack_pod(&world, &conf, "client")?;
    let (_web, web) = add_dual_stack_pod(&world, &conf, "web-a")?;
    write_manifest(
        &world.manifests,
        "slices.yaml",
        &one_endpoint_slices("mute", "[{name: dns, port: 5399, protocol: UDP}]", &web),
    )?;
    for vip in ["10.96.0.43", "fd00:96::43"] {
        let vip: IpAddr = vip.parse()?;
        // Until the frontend has its backend the datapath itself refuses (also ECONNREFUSED).
        wait_backends(&world.pins.0, vip, 53, 1, Instant::now())?;
        let dns = SocketAddr::new(vip, 53);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = client.run(move || -> std::io::Result<()> {
                let any = if vip.is_ipv6() {
                    IpAddr::from([0u16; 8])
                } else {
                    IpAddr::from([0, 0, 0, 0])
                };
                let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
                s.connect(dns)?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                s.send(b"anyone?")?;
                let mut buf = [0u8; 16];
                s.recv(&mut buf).map(drop)
            })?;
            match got {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                other if Instant::now() > deadline => {
                    bail!("UDP to {dns} with nothing on the backend's port: {other:?}, want ECONNREFUSED")
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    Ok(())
}
