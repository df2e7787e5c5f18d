//! The agent restarts — stopped cleanly, killed, and replaced by a new process — under
//! traffic, with no gap: established allowed connections keep flowing, new allowed
//! connections keep being accepted, denied ones keep being refused, and the new agent adopts
//! the pinned programs and maps (the same kernel objects, not reloaded). Then `weft cni
//! status` reports the node. Needs root; build the other binaries first:
//!
//! ```sh
//! cargo build -p weft-cni -p weft-cli && cargo test -p weft-cni-agent --test restart
//! ```

mod support;

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use support::*;

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: rs}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: rs, labels: {app: web}}
spec: {containers: [{name: app, image: x, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: rs, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: rs, labels: {app: intruder}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-client, namespace: rs}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 80}]
"#;

/// The kernel ids of what is pinned: every map, and the programs. Equal before and after a
/// restart means the new agent adopted them.
fn pinned_ids(pin_dir: &Path) -> Result<Vec<(String, u32)>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(pin_dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type()?.is_file() && name.starts_with("weft_") {
            let info = aya::maps::MapInfo::from_pin(e.path())
                .with_context(|| format!("map pin {name}"))?;
            ids.push((name, info.id()));
        }
    }
    for dir in std::fs::read_dir(pin_dir.join("progs"))? {
        let dir = dir?;
        for p in std::fs::read_dir(dir.path())? {
            let p = p?;
            let info = aya::programs::ProgramInfo::from_pin(p.path())
                .with_context(|| format!("program pin {}", p.path().display()))?;
            ids.push((
                format!("prog {}", p.file_name().to_string_lossy()),
                info.id(),
            ));
        }
    }
    ids.sort();
    Ok(ids)
}

/// Traffic running while the agent restarts: established connections echoing, new allowed
/// and new denied connections attempted in a loop. Every failure is counted.
struct Traffic {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    echoes: Arc<AtomicU64>,
    broken: Arc<AtomicU64>,
    new_ok: Arc<AtomicU64>,
    new_failed: Arc<AtomicU64>,
    denied_ok: Arc<AtomicU64>,
    denied_refused: Arc<AtomicU64>,
}

impl Traffic {
    fn start(client: &Pod, intruder: &Pod, web: SocketAddr) -> Result<Traffic> {
        let mut t = Traffic {
            stop: Arc::default(),
            threads: Vec::new(),
            echoes: Arc::default(),
            broken: Arc::default(),
            new_ok: Arc::default(),
            new_failed: Arc::default(),
            denied_ok: Arc::default(),
            denied_refused: Arc::default(),
        };
        for _ in 0..4 {
            let mut conn = client
                .ns
                .run(move || TcpStream::connect_timeout(&web, Duration::from_secs(2)))??;
            let (stop, echoes, broken) = (t.stop.clone(), t.echoes.clone(), t.broken.clone());
            t.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if weft_netns_testing::echo(&mut conn, Duration::from_secs(2)) {
                        echoes.fetch_add(1, Ordering::Relaxed);
                    } else {
                        broken.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        for (ns, allowed) in [
            (client.ns.name.clone(), true),
            (intruder.ns.name.clone(), false),
        ] {
            let stop = t.stop.clone();
            let (ok, failed) = if allowed {
                (t.new_ok.clone(), t.new_failed.clone())
            } else {
                (t.denied_ok.clone(), t.denied_refused.clone())
            };
            t.threads.push(std::thread::spawn(move || {
                if weft_netns_testing::enter(&ns).is_err() {
                    failed.fetch_add(1_000_000, Ordering::Relaxed);
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    let timeout = Duration::from_millis(if allowed { 1500 } else { 300 });
                    if weft_netns_testing::tcp_echo_ok(web, timeout) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }));
        }
        Ok(t)
    }

    fn counts(&self) -> [u64; 6] {
        [
            &self.echoes,
            &self.broken,
            &self.new_ok,
            &self.new_failed,
            &self.denied_ok,
            &self.denied_refused,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    fn finish(mut self) -> [u64; 6] {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.counts()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Waits until every counter in `which` moved past `before` (traffic kept flowing).
fn wait_progress(t: &Traffic, before: [u64; 6], which: &[usize], what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = t.counts();
        if which.iter().all(|&i| now[i] > before[i]) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: traffic did not progress: before {before:?}, now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn agent_restarts_under_traffic_without_a_gap_and_adopts_the_pins() -> Result<()> {
    if !require_root("agent_restart_under_traffic") {
        return Ok(());
    }
    let weft = workspace_bin("weft", "weft-cli");
    let mut world = Node::start(&[("pods.yaml", PODS)], "10.78.0.0/24")?;
    let web = world.add_pod(("rs", "web"))?;
    let client = world.add_pod(("rs", "client"))?;
    let intruder = world.add_pod(("rs", "intruder"))?;
    let _server = tcp_server(&web.ns, web.ip, 80)?;
    let web_addr = SocketAddr::new(web.ip, 80);
    // Policy is in force before the traffic starts.
    let deadline = Instant::now() + Duration::from_secs(3);
    while tcp_ok(&intruder.ns, web.ip, 80, Duration::from_millis(100))? {
        ensure!(Instant::now() < deadline, "the policy never isolated web");
    }
    let ids_before = pinned_ids(&world.pins.0)?;
    ensure!(
        ids_before.iter().any(|(n, _)| n.starts_with("prog ")),
        "no pinned programs: {ids_before:?}"
    );

    let traffic = Traffic::start(&client, &intruder, web_addr)?;
    let before = traffic.counts();
    wait_progress(&traffic, before, &[0, 2, 5], "before the restarts")?;

    // 1. A clean stop (SIGTERM), 300 ms down, a new agent.
    world.agent.stop();
    let down = traffic.counts();
    std::thread::sleep(Duration::from_millis(300));
    wait_progress(&traffic, down, &[0, 2, 5], "agent stopped")?;
    world.agent = Agent::start(&world.node, &world.dirs)?;
    let up = traffic.counts();
    wait_progress(&traffic, up, &[0, 2, 5], "after a clean restart")?;

    // 2. A crash (SIGKILL), straight back.
    if let Some(mut c) = world.agent.child.take() {
        c.kill()?;
        c.wait()?;
    }
    let killed = traffic.counts();
    wait_progress(&traffic, killed, &[0, 2, 5], "agent killed")?;
    world.agent = Agent::start(&world.node, &world.dirs)?;
    let up = traffic.counts();
    wait_progress(&traffic, up, &[0, 2, 5], "after a crash and restart")?;

    let [echoes, broken, new_ok, new_failed, denied_ok, denied_refused] = traffic.finish();
    eprintln!(
        "through two restarts: {echoes} echoes on 4 established connections, {new_ok} new \
         allowed connections, {denied_refused} denied attempts refused"
    );
    ensure!(broken == 0, "{broken} established connections broke");
    ensure!(
        new_failed == 0,
        "{new_failed} new allowed connections failed"
    );
    ensure!(denied_ok == 0, "{denied_ok} denied connections got through");

    let ids_after = pinned_ids(&world.pins.0)?;
    ensure!(
        ids_before == ids_after,
        "the restarted agent did not adopt the pinned objects:\nbefore {ids_before:?}\nafter  {ids_after:?}"
    );

    // `weft cni status` on the node, against the restarted agent.
    let out = world
        .node
        .command(&weft)?
        .args(["cni", "status", "--agent", "127.0.0.1:9964", "-o", "json"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "weft cni status failed ({}): {stdout}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_str(&stdout).context("weft cni status -o json")?;
    let s = &json[0]["status"];
    ensure!(s["node"] == "test-node" && s["ready"] == true, "{s}");
    ensure!(s["endpoints"] == 3, "endpoints: {s}");
    ensure!(s["programs"]["attached_interfaces"] == 3, "attached: {s}");
    ensure!(s["policies"]["programmed"] == 1, "policies: {s}");
    ensure!(s["last_sync"].is_string(), "last sync: {s}");
    ensure!(
        s["problems"].as_array().is_some_and(|p| p.is_empty()),
        "problems: {s}"
    );
    let ct = s["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "weft_ct"))
        .with_context(|| format!("no weft_ct in {s}"))?;
    ensure!(
        ct["type"] == "lru_hash" && ct["entries"].as_u64() > Some(0),
        "{ct}"
    );
    let text = world
        .node
        .command(&weft)?
        .args(["cni", "status", "--agent", "127.0.0.1:9964"])
        .output()?;
    let text = String::from_utf8_lossy(&text.stdout);
    eprintln!("weft cni status:\n{text}");
    ensure!(
        text.contains("node test-node")
            && text.contains("✔ endpoints: 3, programs attached on 3 interfaces"),
        "{text}"
    );
    // The same figures as gauges.
    let (_, metrics) = http_get(&world.node, IpAddr::from([127, 0, 0, 1]), "/metrics")?;
    ensure!(
        metric(&metrics, "weft_cni_attached_interfaces") == Some(3.0),
        "{metrics}"
    );
    ensure!(
        metric(&metrics, "weft_cni_map_capacity{map=\"weft_ct\"}") == ct["max_entries"].as_f64(),
        "{metrics}"
    );
    ensure!(metric(&metrics, "weft_cni_last_sync_timestamp_seconds").is_some_and(|t| t > 0.0));
    Ok(())
}
