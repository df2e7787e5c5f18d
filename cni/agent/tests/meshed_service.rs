//! One Service, two kinds of client (issue 14): a non-meshed pod's connections to the
//! ClusterIP are balanced by the eBPF datapath, while a meshed pod's go through its sidecar —
//! the pod's own nat OUTPUT redirect (weft-init's rules) runs before the packet reaches the
//! host veth, so the proxy still sees the ClusterIP as the original destination, resolves it
//! with the controller and connects to the endpoints itself. Needs root; build the binaries
//! first:
//!
//! ```sh
//! cargo build -p weft-cni -p weft-proxy -p weft-controller -p weft-injector \
//!   && cargo test -p weft-cni-agent --test meshed_service
//! ```

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::*;

const CLUSTER_IP: &str = "10.96.77.10";
const NODE_IP: &str = "10.250.0.1";
const PROXY_UID: u32 = 2102;

/// An HTTP server in a pod answering every request with its name; stopped on drop.
struct Hello {
    stop: Arc<AtomicBool>,
}

impl Hello {
    fn start(pod: &Pod, port: u16, name: &'static str) -> Result<Hello> {
        let addr = SocketAddr::new(pod.ip, port);
        let listener = pod.ns.run(move || TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        // Read the head (until the blank line), answer, close.
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let rsp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                            name.len()
                        );
                        let _ = conn.write_all(rsp.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Ok(Hello { stop })
    }
}

impl Drop for Hello {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One HTTP/1.1 GET from inside `pod` (as root: an app, not the proxy): status and body.
fn get(pod: &Pod, to: SocketAddr) -> Result<(u16, String)> {
    pod.ns.run(move || -> Result<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        // One write: the proxy's protocol detection reads what arrives first.
        s.write_all(
            b"GET / HTTP/1.1\r\nhost: web.ms.svc.cluster.local\r\nconnection: close\r\n\r\n",
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status in {text:?}"))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Ok((code, body))
    })?
}

/// `n` GETs to the ClusterIP; how many each backend answered. Every one must succeed.
fn spread(pod: &Pod, n: usize, what: &str) -> Result<BTreeMap<String, usize>> {
    let to: SocketAddr = format!("{CLUSTER_IP}:80").parse()?;
    let mut seen = BTreeMap::new();
    for i in 0..n {
        let (code, body) = get(pod, to).with_context(|| format!("{what}: request {i}"))?;
        ensure!(code == 200, "{what}: request {i} answered {code}: {body}");
        *seen.entry(body).or_insert(0) += 1;
    }
    Ok(seen)
}

fn manifests(web_a: IpAddr, web_b: IpAddr, meshed: IpAddr, plain: IpAddr) -> String {
    let pod = |name: &str, app: &str, extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ms, labels: {{app: {app}}}{extra}}}\n\
             spec: {{containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}\n"
        )
    };
    let status = |ip: IpAddr| format!("status: {{podIP: \"{ip}\", podIPs: [{{ip: \"{ip}\"}}]}}\n");
    format!(
        "{}{}{}{}{}{}{}{}\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ms}}\n\
         spec:\n  clusterIP: {CLUSTER_IP}\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: http}}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-1, namespace: ms, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n\
         - {{addresses: [\"{web_a}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: web-a, namespace: ms}}}}\n\
         - {{addresses: [\"{web_b}\"], conditions: {{ready: true}}, targetRef: {{kind: Pod, name: web-b, namespace: ms}}}}\n",
        pod("web-a", "web", ""),
        status(web_a),
        pod("web-b", "web", ""),
        status(web_b),
        pod("meshed", "client", ", annotations: {weft.dev/inject: enabled}"),
        status(meshed),
        pod("plain", "client", ""),
        status(plain),
    )
}

/// `weft-controller` inside the node namespace, on the node's address (pods reach it through
/// their default route), plaintext.
struct Controller {
    child: Option<Child>,
    destination: SocketAddr,
}

impl Controller {
    fn start(node: &Netns, manifests: &Path) -> Result<Controller> {
        let bin = workspace_bin("weft-controller", "weft-controller");
        let ports = weft_proto::loopback::free_addrs(3)?;
        let at = |i: usize| SocketAddr::new(NODE_IP.parse().expect("ip"), ports[i].port());
        let (destination, identity, admin) = (at(0), at(1), at(2));
        let child = node
            .command(&bin)?
            .arg("--source")
            .arg(format!("dir:{}", manifests.display()))
            .args(["--destination-addr", &destination.to_string()])
            .args(["--identity-addr", &identity.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .arg("--insecure-plaintext")
            .env("WEFT_CONTROLLER_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .context("spawning weft-controller")?;
        let c = Controller {
            child: Some(child),
            destination,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(
            weft_netns_testing::http_get(&node.name, admin, "/ready"),
            Ok((200, _))
        ) {
            ensure!(
                Instant::now() < deadline,
                "weft-controller not ready in 15 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(c)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            weft_netns_testing::stop_child(c);
        }
    }
}

/// The proxy's metric `name` summed over series whose labels contain `with`.
fn proxy_metric(pod: &Pod, name: &str, with: &str) -> Result<f64> {
    let (code, text) =
        weft_netns_testing::http_get(&pod.ns.name, "127.0.0.1:4191".parse()?, "/metrics")?;
    ensure!(code == 200, "proxy /metrics answered {code}");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(with))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

#[test]
fn a_meshed_client_is_routed_by_its_proxy_and_a_plain_one_by_ebpf_to_one_service() -> Result<()> {
    if !require_root("meshed_and_plain_clients_of_one_service") {
        return Ok(());
    }
    let proxy = workspace_bin("weft-proxy", "weft-proxy");
    let init = workspace_bin("weft-init", "weft-injector");
    let ns_yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: ms}\n";
    let world = Node::start(&[("ns.yaml", ns_yaml)], "10.79.0.0/24")?;
    let web_a = world.add_pod(("ms", "web-a"))?;
    let web_b = world.add_pod(("ms", "web-b"))?;
    let meshed = world.add_pod(("ms", "meshed"))?;
    let plain = world.add_pod(("ms", "plain"))?;
    let _servers = [
        Hello::start(&web_a, 8080, "web-a")?,
        Hello::start(&web_b, 8080, "web-b")?,
    ];
    world.write(
        "world.yaml",
        &manifests(web_a.ip, web_b.ip, meshed.ip, plain.ip),
    )?;
    let controller = Controller::start(&world.node, &world.manifests)?;

    // The plain client: the eBPF datapath translates the ClusterIP (within 1 s of the
    // manifests), spreading over both backends.
    let deadline = Instant::now() + Duration::from_secs(3);
    let to: SocketAddr = format!("{CLUSTER_IP}:80").parse()?;
    while get(&plain, to).is_err() {
        ensure!(
            Instant::now() < deadline,
            "the ClusterIP never answered the plain client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = spread(&plain, 40, "plain client")?;
    ensure!(
        seen.len() == 2 && seen.values().all(|&n| n >= 5),
        "the plain client should reach both backends through eBPF: {seen:?}"
    );

    // The meshed client: weft-init's rules in its namespace, its proxy as UID 2102.
    let out = meshed.ns.command(&init)?.output()?;
    ensure!(
        out.status.success(),
        "weft-init: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let proxy_log = world.tmp.path().join("proxy.log");
    let log = std::fs::File::create(&proxy_log)?;
    let mut proxy_child = meshed
        .ns
        .command("setpriv")?
        .args([
            format!("--reuid={PROXY_UID}"),
            format!("--regid={PROXY_UID}"),
            "--clear-groups".to_string(),
        ])
        .arg(&proxy)
        .env("WEFT_PROXY_OUTBOUND_ADDR", "[::]:4140")
        .env("WEFT_PROXY_INBOUND_ADDR", "[::]:4143")
        .env("WEFT_PROXY_ADMIN_ADDR", "127.0.0.1:4191")
        .env(
            "WEFT_PROXY_DESTINATION_ADDR",
            format!("http://{}", controller.destination),
        )
        .env("WEFT_PROXY_NAMESPACE", "ms")
        .env("WEFT_PROXY_POD_NAME", "meshed")
        .env("WEFT_PROXY_LOG", "warn,weft=info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning weft-proxy")?;
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !matches!(
            weft_netns_testing::http_get(&meshed.ns.name, "127.0.0.1:4191".parse()?, "/ready"),
            Ok((200, _))
        ) {
            if let Some(status) = proxy_child.try_wait()? {
                bail!("weft-proxy exited: {status}");
            }
            ensure!(Instant::now() < deadline, "weft-proxy not ready in 15 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Answered by the Service's pods (how the proxy's peak-EWMA balancer spreads 40
        // requests depends on their latencies, so no share is asserted here).
        let seen = spread(&meshed, 40, "meshed client")?;
        ensure!(
            seen.keys().all(|k| k == "web-a" || k == "web-b"),
            "the meshed client got answers from outside the Service: {seen:?}"
        );
        // Its proxy carried all 40: it saw the ClusterIP as the original destination (the
        // redirect ran before the datapath) and balanced over the two endpoints discovery gave
        // it for that address.
        let requests = proxy_metric(
            &meshed,
            "weft_http_requests_total",
            "direction=\"outbound\"",
        )?;
        ensure!(
            requests == 40.0,
            "the proxy counted {requests} outbound requests, not 40"
        );
        let endpoints = proxy_metric(&meshed, "weft_balancer_endpoints", "")?;
        ensure!(
            endpoints == 2.0,
            "the proxy's balancer should hold the Service's 2 endpoints, holds {endpoints}"
        );
        Ok(())
    })();
    let _ = proxy_child.kill();
    let _ = proxy_child.wait();
    if result.is_err() {
        eprintln!(
            "--- proxy log ---\n{}",
            std::fs::read_to_string(&proxy_log).unwrap_or_default()
        );
    }
    result?;
    drop(controller);
    Ok(())
}
