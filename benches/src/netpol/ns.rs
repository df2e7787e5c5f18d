//! Network namespaces, the node agent and the CNI plugin, as `weft-bench netpol` runs them:
//! the namespace guard, `ip`, the plugin runner and the HTTP probe are weft-netns-testing's,
//! which the CNI crates' namespace tests use too. Every resource is a guard that removes what
//! it made when dropped, so an error or a panic anywhere leaves no namespace, process, pin or
//! file behind.
//!
//! The agent enters the node namespace with `setns` on the network namespace only (in the
//! child, before exec), not with `ip netns exec`: that one also remounts /sys in a private
//! mount namespace, which would hide /sys/fs/bpf from the agent.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};
pub use weft_netns_testing::{Netns, CNI_BIN_DIR};

/// The agent's metrics port inside the node namespace.
pub const METRICS_PORT: u16 = 9964;

/// Starts `f` on a thread inside namespace `ns`, pinned to `cpu` if given.
pub fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    cpu: Option<usize>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<JoinHandle<Result<T>>> {
    let name = ns.name.clone();
    Ok(std::thread::spawn(move || {
        weft_netns_testing::enter(&name)?;
        if let Some(cpu) = cpu {
            crate::sys::affinity::pin_current_thread(cpu)
                .with_context(|| format!("pinning a thread in {name} to CPU {cpu}"))?;
        }
        f()
    }))
}

/// A directory removed with everything in it on drop: the manifests, host-local's leases,
/// the agent's state, socket and log.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("weft-bench-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A pin directory on the host's bpffs; removed on drop (unlinking the pins of the tcx links,
/// programs and maps releases them once nothing else holds them).
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> PinDir {
        PinDir(
            PathBuf::from("/sys/fs/bpf").join(format!("weft-bench-{tag}-{}", std::process::id())),
        )
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.0.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.0) {
                eprintln!(
                    "weft-bench netpol: removing {}: {e}; remove it by hand",
                    self.0.display()
                );
            }
        }
    }
}

/// A child process killed (SIGTERM, then SIGKILL after 5 s) and reaped on drop.
pub struct Proc {
    pub child: Option<Child>,
    pub what: String,
}

impl Proc {
    pub fn new(child: Child, what: impl Into<String>) -> Proc {
        Proc {
            child: Some(child),
            what: what.into(),
        }
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("{} exited: {status}", self.what);
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            weft_netns_testing::stop_child(c);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Starts `weft-cni-agent` in `node` with a manifest directory source and waits for `/ready`.
pub fn start_agent(
    node: &Netns,
    agent_bin: &Path,
    manifests: &Path,
    pins: &Path,
    work: &Path,
) -> Result<Proc> {
    let log_path = work.join("agent.log");
    let log = File::create(&log_path)?;
    let child = node
        .command(agent_bin)?
        .arg("--source")
        .arg(format!("dir:{}", manifests.display()))
        .args(["--node", "bench-node", "--pin-dir"])
        .arg(pins)
        .arg("--socket")
        .arg(work.join("cni.sock"))
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{METRICS_PORT}"))
        .arg("--state-dir")
        .arg(work.join("state"))
        .args(["--log", "warn,weft=info,weft_cni_agent=info"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", agent_bin.display()))?;
    let mut agent = Proc::new(child, "weft-cni-agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        agent.check_alive().with_context(|| tail(&log_path, 30))?;
        if let Ok((200, _)) = http_get(node, "/ready") {
            return Ok(agent);
        }
        if Instant::now() > deadline {
            bail!(
                "weft-cni-agent not ready within 30 s; its log:\n{}",
                tail(&log_path, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` from the agent's metrics server, from inside `node`.
pub fn http_get(node: &Netns, path: &str) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    weft_netns_testing::http_get(&node.name, addr, path)
}

/// The weft-cni network configuration: primary mode, host-local in `ipam_dir`.
pub fn plugin_conf(socket: &Path, ipam_dir: &Path, subnet: &str, mtu: u32) -> Value {
    json!({
        "cniVersion": "1.1.0",
        "name": "weft",
        "type": "weft-cni",
        "mtu": mtu,
        "agentSocket": socket,
        "agentTimeoutMs": 5000,
        "ipam": { "type": "host-local", "dataDir": ipam_dir, "ranges": [[{ "subnet": subnet }]] },
    })
}

/// Runs the plugin in `node` as a runtime does (`ip netns exec` is fine for the plugin: it
/// touches no bpffs) and returns its result.
pub fn cni_add(
    node: &Netns,
    plugin: &Path,
    container_id: &str,
    pod_ns: &Netns,
    pod: (&str, &str),
    conf: &Value,
) -> Result<Value> {
    let env = weft_netns_testing::cni_env("ADD", container_id, &pod_ns.path(), pod);
    let stdin = serde_json::to_vec(conf)?;
    let out = weft_netns_testing::exec_cni(node, plugin, env, &stdin, Stdio::piped())?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "weft-cni ADD {}/{} failed ({}): {stdout} {}",
        pod.0,
        pod.1,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).with_context(|| format!("ADD result is not JSON: {stdout}"))
}

/// The pod address and prefix of an ADD result ("10.77.0.2/24").
pub fn result_addr(result: &Value) -> Result<(IpAddr, String)> {
    let cidr = result["ips"][0]["address"]
        .as_str()
        .with_context(|| format!("no address in {result}"))?;
    let ip = cidr
        .split('/')
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("bad address {cidr}"))?;
    Ok((ip, cidr.to_owned()))
}

/// Wires a pod by hand exactly as weft-cni's primary mode does (veth pair of `mtu`, the pod
/// end `eth0` with `cidr`, a permanent neighbour 169.254.1.1 → the host veth's MAC and a
/// default route via it onlink; on the host side forwarding, proxy ARP and a /32 route), but
/// registers nothing and attaches no program: the baseline path.
pub fn wire_plain(node: &Netns, pod: &Netns, host_if: &str, cidr: &str, mtu: u32) -> Result<()> {
    let mtu = mtu.to_string();
    node.ip(&[
        "link", "add", host_if, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu,
        "netns", &pod.name,
    ])?;
    node.sysctl(&[
        "net.ipv4.ip_forward=1",
        &format!("net.ipv4.conf.{host_if}.proxy_arp=1"),
        &format!("net.ipv4.conf.{host_if}.forwarding=1"),
    ])?;
    node.ip(&["link", "set", host_if, "up"])?;
    let links: Value = serde_json::from_str(&node.ip(&["-j", "link", "show", host_if])?)?;
    let mac = links[0]["address"]
        .as_str()
        .with_context(|| format!("no MAC for {host_if}"))?
        .to_owned();
    pod.ip(&["link", "set", "eth0", "up"])?;
    pod.ip(&["addr", "add", cidr, "dev", "eth0"])?;
    pod.ip(&[
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        &mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    pod.ip(&[
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
        "onlink",
    ])?;
    let host = cidr.split('/').next().unwrap_or(cidr);
    node.ip(&[
        "route",
        "add",
        &format!("{host}/32"),
        "dev",
        host_if,
        "scope",
        "link",
    ])?;
    Ok(())
}

/// Programs attached through tc or XDP on `node`'s interfaces, as `bpftool net` lists them
/// (the baseline's check: it must be empty). bpftool before 7.3 does not list tcx links,
/// hence [`pinned_links`] for the subject.
pub fn attached_programs(node: &Netns) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &node.name, "bpftool", "net", "show"])
        .output()
        .context("running bpftool net show")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("id "))
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; "))
}

/// The tcx links the agent pinned (`<ifindex>-<program>`), sorted.
pub fn pinned_links(pins: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pins.join("links"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
