//! The agent's other inputs, end to end with the real `weft-cni-agent` and `weft-cni`
//! binaries on a "node" network namespace (as `netns.rs` does) and real TCP connections:
//!
//! - `--source kube` against the fake Kubernetes API server (reached through a kubeconfig,
//!   as in production): `/ready` before and after the sync, a policy applied, edited and
//!   deleted through the API server, Pods with and without `status.podIPs`;
//! - IPv6: a dual-stack host-local range, pod selectors over both families, an IPv6
//!   `ipBlock` with `except`;
//! - chained mode: `ptp` first, then `weft-cni` with `prevResult`, DEL through both.
//!
//! Needs root; build the other binaries first:
//!
//! ```sh
//! cargo build -p weft-cni -p weft-cli && cargo test -p weft-cni-agent --test sources
//! ```

mod support;

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use support::*;
use weft_cni::agent_proto::{AgentClient, Request, Response};
use weft_controller::testing::fake_apiserver::{FakeApiServer, Resource};

const ALLOWED: Duration = Duration::from_millis(1500);
const DENIED: Duration = Duration::from_millis(300);

/// A pod made by the plugin: its namespace, addresses (IPv4 first) and CNI identity.
struct Pod {
    ns: Netns,
    ips: Vec<IpAddr>,
    cid: String,
    key: (&'static str, &'static str),
}

impl Pod {
    fn v4(&self) -> IpAddr {
        *self
            .ips
            .iter()
            .find(|i| i.is_ipv4())
            .expect("an IPv4 address")
    }

    fn v6(&self) -> IpAddr {
        *self
            .ips
            .iter()
            .find(|i| i.is_ipv6())
            .expect("an IPv6 address")
    }
}

/// Every address of an ADD result, IPv4 first.
fn result_ips(result: &Value) -> Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .with_context(|| format!("no ips in {result}"))?
        .iter()
        .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
        .collect();
    ips.sort_by_key(|i| i.is_ipv6());
    ensure!(!ips.is_empty(), "no address in {result}");
    Ok(ips)
}

fn add_pod(
    node: &Netns,
    plugin: &Path,
    conf: &Value,
    key: (&'static str, &'static str),
) -> Result<Pod> {
    let ns = Netns::new(key.1)?;
    let cid = unique(key.1);
    let (code, out) = cni(node, plugin, "ADD", &cid, &ns.path(), key, conf)?;
    ensure!(code == 0, "ADD {key:?} failed: {out}");
    Ok(Pod {
        ips: result_ips(&serde_json::from_str(&out)?)?,
        ns,
        cid,
        key,
    })
}

fn tcp(from: &Netns, to: &Pod, ip: IpAddr, port: u16, want: bool, what: &str) -> Result<()> {
    let got = tcp_ok(from, ip, port, if want { ALLOWED } else { DENIED })?;
    ensure!(
        got == want,
        "{what}: TCP to {}/{} [{ip}]:{port} {} but should be {}",
        to.key.0,
        to.key.1,
        if got { "connected" } else { "was refused" },
        if want { "allowed" } else { "denied" }
    );
    Ok(())
}

/// Polls until a TCP connection from `from` to `ip:port` gets through; the time it took.
/// For the flips after a policy change, and for addresses that may still be tentative.
fn connects_within(from: &Netns, ip: IpAddr, port: u16, within: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if tcp_ok(from, ip, port, Duration::from_millis(50))? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            bail!("TCP to [{ip}]:{port} did not connect within {within:?}");
        }
    }
}

/// Polls until new TCP connections from `from` to `ip:port` stop getting through.
fn refused_within(from: &Netns, ip: IpAddr, port: u16, within: Duration) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if !tcp_ok(from, ip, port, Duration::from_millis(100))? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > within {
            bail!("TCP to [{ip}]:{port} still connects after {within:?}");
        }
    }
}

fn agent_dirs(tmp: &Path, pins: &PinDir) -> Result<AgentDirs> {
    let manifests = tmp.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    Ok(AgentDirs {
        manifests,
        pin_dir: pins.0.clone(),
        state_dir: tmp.join("state"),
        socket: tmp.join("cni.sock"),
        log: tmp.join("agent.log"),
    })
}

/// Replaces a manifest file atomically (the source never reads half of it).
fn write_manifest(dir: &Path, name: &str, text: &str) -> Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// --source kube

/// The fake API server, run on a thread inside the node namespace so the agent reaches it
/// on the node's loopback. The kubeconfig points at a gate in front of it: connections are
/// accepted but held until [`KubeApi::open`], so the agent's first sync waits for the test.
struct KubeApi {
    fake: Arc<FakeApiServer>,
    gate: SocketAddr,
    open: tokio::sync::watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KubeApi {
    fn start(node: &Netns) -> Result<KubeApi> {
        let netns = File::open(node.path())?;
        let (open, open_rx) = tokio::sync::watch::channel(false);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let started = (|| -> Result<_> {
                // SAFETY: setns with an open netns fd changes only this thread (and the
                // runtime's, which is this one).
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                Ok(tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?)
            })();
            let rt = match started {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let up = async {
                    let fake = Arc::new(FakeApiServer::start().await?);
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    anyhow::Ok((fake, listener))
                };
                let (fake, listener) = match up.await {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let upstream = fake.addr();
                let gate = listener.local_addr().expect("gate address");
                let _ = ready_tx.send(Ok((fake.clone(), gate)));
                tokio::spawn(async move {
                    while let Ok((mut inbound, _)) = listener.accept().await {
                        let mut open = open_rx.clone();
                        tokio::spawn(async move {
                            if open.wait_for(|o| *o).await.is_err() {
                                return;
                            }
                            if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut up).await;
                            }
                        });
                    }
                });
                let _ = stop_rx.await;
                drop(fake);
            });
        });
        let (fake, gate) = ready_rx
            .recv()
            .context("the fake API server's thread ended")??;
        Ok(KubeApi {
            fake,
            gate,
            open,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn open(&self) {
        let _ = self.open.send(true);
    }

    fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\ncurrent-context: fake\n",
                self.gate
            ),
        )?;
        Ok(path)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `/ready`'s status code, once the metrics server answers.
fn ready_code(node: &Netns, within: Duration) -> Result<u16> {
    let deadline = Instant::now() + within;
    loop {
        match http_get(node, IpAddr::from([127, 0, 0, 1]), "/ready") {
            Ok((code, _)) => return Ok(code),
            Err(e) if Instant::now() > deadline => bail!("/ready did not answer: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(25)),
        }
    }
}

fn pod_object(name: &str, labels: Value, ips: &[IpAddr]) -> Value {
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "alpha", "uid": format!("uid-{name}"), "labels": labels},
        "spec": {"nodeName": "test-node", "containers": [{"name": "app", "image": "x", "ports": [{"containerPort": 80}]}]},
        "status": {"phase": "Pending"},
    });
    if !ips.is_empty() {
        pod["status"] = json!({
            "phase": "Running",
            "podIP": ips[0].to_string(),
            "podIPs": ips.iter().map(|i| json!({"ip": i.to_string()})).collect::<Vec<_>>(),
        });
    }
    pod
}

fn netpol(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "alpha"}, "spec": spec})
}

fn allow_client_web(port: u16) -> Value {
    netpol(
        "allow-client-web",
        json!({"podSelector": {"matchLabels": {"app": "web"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                            "ports": [{"port": port}]}]}),
    )
}

#[test]
fn kube_source_ready_after_sync_policy_applied_edited_and_deleted_through_the_api_server(
) -> Result<()> {
    if !require_root("kube_source") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let tmp = tempfile::tempdir()?;
    let pins = PinDir::new();
    let dirs = agent_dirs(tmp.path(), &pins)?;
    let node = node_ns()?;
    let api = KubeApi::start(&node)?;
    let kubeconfig = api.kubeconfig(tmp.path())?;

    // The cluster before any pod exists: a namespace, the pods' objects (no addresses
    // yet, as before the kubelet reports them) and a default-deny plus an allow.
    api.fake
        .apply(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": "alpha", "labels": {"team": "alpha"}}}));
    for (name, app) in [("web", "web"), ("client", "client"), ("other", "other")] {
        api.fake.apply(pod_object(name, json!({"app": app}), &[]));
    }
    api.fake
        .apply(netpol("default-deny", json!({"podSelector": {}})));
    api.fake.apply(allow_client_web(80));

    // Not ready while the API server holds the lists back.
    let agent = Agent::spawn(&node, &dirs, "kube", Some(&kubeconfig))?;
    let code = ready_code(&node, Duration::from_secs(10))?;
    ensure!(code == 503, "/ready before the source synced: {code}");
    let status = AgentClient::new(&agent.socket).call(&Request::Status)?;
    ensure!(
        matches!(status, Response::Error { .. }),
        "STATUS before the source synced: {status:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let code = ready_code(&node, Duration::from_secs(1))?;
    ensure!(code == 503, "/ready 300 ms later, still not synced: {code}");
    let t0 = Instant::now();
    api.open();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready_code(&node, Duration::from_secs(1))? != 200 {
        ensure!(
            Instant::now() < deadline,
            "/ready not 200 within 10 s of the API server answering\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "kube source: /ready 503 while held, 200 {} ms after the API server answered",
        t0.elapsed().as_millis()
    );
    agent.wait_ready(Duration::from_secs(5))?;

    let hl = HostLocal::new()?;
    let conf = plugin_conf(&dirs.socket, hl.ipam("10.80.0.0/24"));
    let web = add_pod(&node, &plugin, &conf, ("alpha", "web"))?;
    let client = add_pod(&node, &plugin, &conf, ("alpha", "client"))?;
    let other = add_pod(&node, &plugin, &conf, ("alpha", "other"))?;
    // web and other get their status.podIPs (what IPAM gave); client keeps none, so its
    // address comes from the agent's IPAM overlay alone.
    api.fake
        .apply(pod_object("web", json!({"app": "web"}), &web.ips));
    api.fake
        .apply(pod_object("other", json!({"app": "other"}), &other.ips));
    let _servers = [
        tcp_server(&web.ns, web.v4(), 80)?,
        tcp_server(&web.ns, web.v4(), 81)?,
        tcp_server(&client.ns, client.v4(), 80)?,
    ];

    tcp(&client.ns, &web, web.v4(), 80, true, "allow-client-web")?;
    tcp(&client.ns, &web, web.v4(), 81, false, "port not allowed")?;
    tcp(&other.ns, &web, web.v4(), 80, false, "other is not client")?;
    tcp(&web.ns, &client, client.v4(), 80, false, "default-deny")?;
    tcp(
        &node,
        &web,
        web.v4(),
        81,
        true,
        "the node reaches an isolated pod",
    )?;

    // An edit through the API server: the allowed port moves from 80 to 81.
    api.fake.apply(allow_client_web(81));
    let took = connects_within(&client.ns, web.v4(), 81, Duration::from_secs(3))?;
    eprintln!(
        "kube source: policy edit enforced for new connections after {} ms",
        took.as_millis()
    );
    ensure!(
        took < Duration::from_secs(1),
        "edit took {took:?}, more than 1 s"
    );
    tcp(
        &client.ns,
        &web,
        web.v4(),
        80,
        false,
        "80 no longer allowed",
    )?;

    // A label change on a Pod through the API server: other becomes a client.
    api.fake
        .apply(pod_object("other", json!({"app": "client"}), &other.ips));
    let took = connects_within(&other.ns, web.v4(), 81, Duration::from_secs(3))?;
    eprintln!(
        "kube source: pod label change enforced after {} ms",
        took.as_millis()
    );
    ensure!(took < Duration::from_secs(1), "label change took {took:?}");

    // Deleting the policies lifts the isolation.
    api.fake
        .delete(Resource::NetworkPolicies, "alpha", "allow-client-web");
    api.fake
        .delete(Resource::NetworkPolicies, "alpha", "default-deny");
    let took = connects_within(&web.ns, client.v4(), 80, Duration::from_secs(3))?;
    eprintln!(
        "kube source: deleting the policies lifted isolation after {} ms",
        took.as_millis()
    );
    ensure!(took < Duration::from_secs(1), "delete took {took:?}");
    tcp(&client.ns, &web, web.v4(), 80, true, "no policy left")?;

    for p in [&web, &client, &other] {
        let (code, out) = cni(&node, &plugin, "DEL", &p.cid, &p.ns.path(), p.key, &conf)?;
        ensure!(code == 0, "DEL {:?}: {out}", p.key);
    }
    nothing_left(&pins, &dirs.state_dir)?;
    drop(agent);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// IPv6

const DUAL_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: alpha}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: alpha, labels: {app: web}}
spec: {containers: [{name: app, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: alpha, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: alpha, labels: {app: other}}
spec: {containers: [{name: app, image: x}]}
"#;

const DUAL_SELECTOR: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: alpha}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

fn dual_ip_block(except: IpAddr) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web, namespace: alpha}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{ipBlock: {{cidr: "fd00:82::/64", except: ["{except}/128"]}}}}]
    ports: [{{port: 80}}]
"#
    )
}

#[test]
fn ipv6_pod_selector_and_ip_block_with_except_over_dual_stack() -> Result<()> {
    if !require_root("ipv6") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let tmp = tempfile::tempdir()?;
    let pins = PinDir::new();
    let dirs = agent_dirs(tmp.path(), &pins)?;
    write_manifest(&dirs.manifests, "pods.yaml", DUAL_PODS)?;
    write_manifest(&dirs.manifests, "policy.yaml", DUAL_SELECTOR)?;
    let node = node_ns()?;
    // No global IPv6 address on the node: it reaches its pods over IPv6 from its link-local
    // address on each pod's veth, which the node's fe80::/10 entries must let through.
    let agent = Agent::start(&node, &dirs)?;
    let hl = HostLocal::new()?;
    let ipam = json!({"type": "host-local", "dataDir": hl.dir.path(),
                      "ranges": [[{"subnet": "10.82.0.0/24"}], [{"subnet": "fd00:82::/64"}]]});
    let conf = plugin_conf(&dirs.socket, ipam);
    let web = add_pod(&node, &plugin, &conf, ("alpha", "web"))?;
    let client = add_pod(&node, &plugin, &conf, ("alpha", "client"))?;
    let other = add_pod(&node, &plugin, &conf, ("alpha", "other"))?;
    for p in [&web, &client, &other] {
        ensure!(
            p.ips.len() == 2 && p.ips[0].is_ipv4() && p.ips[1].is_ipv6(),
            "{:?}: dual-stack ADD gave {:?}",
            p.key,
            p.ips
        );
    }
    let _servers = [
        tcp_server(&web.ns, web.v4(), 80)?,
        tcp_server(&web.ns, web.v6(), 80)?,
        tcp_server(&web.ns, web.v6(), 81)?,
        tcp_server(&client.ns, client.v6(), 80)?,
    ];

    // The allowed paths first, polled: they also prove the IPv6 addresses are usable (no
    // longer tentative), so the denied ones below fail for the policy's sake.
    connects_within(&client.ns, web.v6(), 80, Duration::from_secs(5))
        .context("client → web over IPv6, selected by podSelector")?;
    tcp(
        &client.ns,
        &web,
        web.v4(),
        80,
        true,
        "client → web over IPv4",
    )?;
    connects_within(&node, web.v6(), 81, Duration::from_secs(5))
        .context("the node reaches an isolated pod over IPv6")?;
    connects_within(&other.ns, client.v6(), 80, Duration::from_secs(5))
        .context("other → client (not isolated) over IPv6")?;
    tcp(
        &other.ns,
        &web,
        web.v6(),
        80,
        false,
        "other is not client (IPv6)",
    )?;
    tcp(
        &other.ns,
        &web,
        web.v4(),
        80,
        false,
        "other is not client (IPv4)",
    )?;
    tcp(
        &client.ns,
        &web,
        web.v6(),
        81,
        false,
        "port 81 not allowed (IPv6)",
    )?;

    // An IPv6 ipBlock with an except: client's address is in, other's is carved out, and
    // no IPv4 source is named at all.
    write_manifest(&dirs.manifests, "policy.yaml", &dual_ip_block(other.v6()))?;
    refused_within(&client.ns, web.v4(), 80, Duration::from_secs(3))
        .context("the ipBlock names no IPv4 source")?;
    tcp(
        &client.ns,
        &web,
        web.v6(),
        80,
        true,
        "client inside fd00:82::/64",
    )?;
    tcp(&other.ns, &web, web.v6(), 80, false, "other is the except")?;
    tcp(
        &other.ns,
        &web,
        web.v4(),
        80,
        false,
        "IPv4, not in the ipBlock",
    )?;

    for p in [&web, &client, &other] {
        let (code, out) = cni(&node, &plugin, "DEL", &p.cid, &p.ns.path(), p.key, &conf)?;
        ensure!(code == 0, "DEL {:?}: {out}", p.key);
    }
    nothing_left(&pins, &dirs.state_dir)?;
    ensure!(hl.leases()?.is_empty(), "leases left: {:?}", hl.leases()?);
    drop(agent);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Chained mode

const CHAIN_WORLD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: alpha, labels: {app: web}}
spec: {containers: [{name: app, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: alpha, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: alpha}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client-web, namespace: alpha}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

/// A pod wired by ptp then weft-cni, as a conflist runtime runs them.
struct ChainedPod {
    pod: Pod,
    prev: Value,
    host_ifname: String,
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

fn chained_add(
    node: &Netns,
    plugin: &Path,
    ptp: &Value,
    weft: &Value,
    key: (&'static str, &'static str),
) -> Result<ChainedPod> {
    let ptp_bin = Path::new(CNI_BIN_DIR).join("ptp");
    let ns = Netns::new(key.1)?;
    let cid = unique(key.1);
    let (code, out) = cni(node, &ptp_bin, "ADD", &cid, &ns.path(), key, ptp)?;
    ensure!(code == 0, "ptp ADD {key:?}: {out}");
    let prev: Value = serde_json::from_str(&out)?;
    let (code, out) = cni(
        node,
        plugin,
        "ADD",
        &cid,
        &ns.path(),
        key,
        &with_prev(weft, &prev),
    )?;
    ensure!(code == 0, "weft-cni ADD {key:?} after ptp: {out}");
    let passed: Value = serde_json::from_str(&out)?;
    ensure!(
        passed == prev,
        "prevResult passes through: {passed} vs {prev}"
    );
    let host_ifname = prev["interfaces"]
        .as_array()
        .and_then(|a| {
            a.iter().find(|i| {
                i.get("sandbox")
                    .is_none_or(|s| s.as_str().unwrap_or("").is_empty())
            })
        })
        .and_then(|i| i["name"].as_str())
        .with_context(|| format!("no host interface in ptp's result {prev}"))?
        .to_string();
    Ok(ChainedPod {
        pod: Pod {
            ips: result_ips(&prev)?,
            ns,
            cid,
            key,
        },
        prev,
        host_ifname,
    })
}

fn ifindex(node: &Netns, name: &str) -> Result<u32> {
    let v: Value = serde_json::from_str(&node.ip(&["-j", "link", "show", name])?)?;
    v[0]["ifindex"]
        .as_u64()
        .map(|i| i as u32)
        .with_context(|| format!("no ifindex for {name}"))
}

#[test]
fn chained_after_ptp_enforces_on_ptps_veth_and_del_through_both_leaves_nothing() -> Result<()> {
    if !require_root("chained_after_ptp") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let tmp = tempfile::tempdir()?;
    let pins = PinDir::new();
    let dirs = agent_dirs(tmp.path(), &pins)?;
    write_manifest(&dirs.manifests, "world.yaml", CHAIN_WORLD)?;
    let node = node_ns()?;
    let agent = Agent::start(&node, &dirs)?;
    let hl = HostLocal::new()?;
    // Debian's ptp speaks up to 1.0.0: the whole list is 1.0.0.
    let ptp = json!({"cniVersion": "1.0.0", "name": "ptpnet", "type": "ptp", "ipam": hl.ipam("10.83.0.0/24")});
    let weft = json!({"cniVersion": "1.0.0", "name": "ptpnet", "type": "weft-cni", "agentSocket": dirs.socket});
    let web = chained_add(&node, &plugin, &ptp, &weft, ("alpha", "web"))?;
    let client = chained_add(&node, &plugin, &ptp, &weft, ("alpha", "client"))?;
    ensure!(
        !node.links()?.iter().any(|l| l.starts_with("lxc")),
        "chained mode creates no veth of its own: {:?}",
        node.links()?
    );
    {
        let dp = weft_datapath::Datapath::open(&pins.0)?;
        let attached = dp.attached()?;
        for p in [&web, &client] {
            let ix = ifindex(&node, &p.host_ifname)?;
            ensure!(
                attached.contains(&ix),
                "{:?}: ptp's host veth {} (ifindex {ix}) not attached: {attached:?}",
                p.pod.key,
                p.host_ifname
            );
        }
    }
    let _servers = [
        tcp_server(&web.pod.ns, web.pod.v4(), 80)?,
        tcp_server(&web.pod.ns, web.pod.v4(), 81)?,
        tcp_server(&client.pod.ns, client.pod.v4(), 80)?,
    ];
    let (w, c) = (&web.pod, &client.pod);
    tcp(&c.ns, w, w.v4(), 80, true, "allow-client-web on ptp's veth")?;
    tcp(
        &c.ns,
        w,
        w.v4(),
        81,
        false,
        "port not allowed on ptp's veth",
    )?;
    tcp(&w.ns, c, c.v4(), 80, false, "default-deny on ptp's veth")?;

    // DEL in the chain's reverse order: weft-cni, then ptp.
    let ptp_bin = Path::new(CNI_BIN_DIR).join("ptp");
    for p in [&web, &client] {
        let k = p.pod.key;
        let (code, out) = cni(
            &node,
            &plugin,
            "DEL",
            &p.pod.cid,
            &p.pod.ns.path(),
            k,
            &with_prev(&weft, &p.prev),
        )?;
        ensure!(code == 0, "weft-cni DEL {k:?}: {out}");
        let (code, out) = cni(
            &node,
            &ptp_bin,
            "DEL",
            &p.pod.cid,
            &p.pod.ns.path(),
            k,
            &with_prev(&ptp, &p.prev),
        )?;
        ensure!(code == 0, "ptp DEL {k:?}: {out}");
    }
    nothing_left(&pins, &dirs.state_dir)?;
    let (_, text) = http_get(&node, IpAddr::from([127, 0, 0, 1]), "/metrics")?;
    ensure!(
        metric(&text, "weft_cni_endpoints") == Some(0.0),
        "weft_cni_endpoints after DEL:\n{text}"
    );
    ensure!(hl.leases()?.is_empty(), "leases left: {:?}", hl.leases()?);
    drop(agent);
    Ok(())
}
