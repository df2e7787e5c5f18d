//! The real `weft-cni-agent` and `weft-cni` binaries on a "node" network namespace, with
//! host-local IPAM, pods as namespaces, a manifest directory as the source and real TCP and
//! UDP connections. Needs root; build the other binaries first:
//!
//! ```sh
//! cargo build -p weft-cni -p weft-cli && cargo test -p weft-cni-agent
//! ```

mod support;

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use support::*;

const ALLOWED: Duration = Duration::from_millis(1500);
const DENIED: Duration = Duration::from_millis(300);

const PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: alpha, labels: {team: alpha}}
---
apiVersion: v1
kind: Namespace
metadata: {name: beta}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: alpha, labels: {app: web}}
spec:
  containers: [{name: app, image: x, ports: [{containerPort: 80}, {containerPort: 5353, protocol: UDP}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: alpha, labels: {app: client}}
spec: {containers: [{name: app, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: beta, labels: {app: api}}
spec:
  containers:
  - {name: app, image: x, ports: [{containerPort: 8080}]}
  - name: weft-proxy
    image: weft-proxy
    env: [{name: WEFT_PROXY_INBOUND_ADDR, value: "0.0.0.0:4143"}]
    ports: [{containerPort: 4143}]
"#;

fn policies(web_port: u16) -> String {
    format!(
        r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: default-deny, namespace: alpha}}
spec: {{podSelector: {{}}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: allow-client-web, namespace: alpha}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from: [{{podSelector: {{matchLabels: {{app: client}}}}}}]
    ports: [{{port: {web_port}}}, {{protocol: UDP, port: 5353}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: api, namespace: beta}}
spec:
  podSelector: {{matchLabels: {{app: api}}}}
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{team: alpha}}}}}}]
    ports: [{{port: 8080}}]
"#
    )
}

fn tcp(from: &Netns, to: &Pod, port: u16, want: bool, what: &str) -> Result<()> {
    let got = tcp_ok(from, to.ip, port, if want { ALLOWED } else { DENIED })?;
    ensure!(
        got == want,
        "{what}: TCP to {}/{}:{port} {} but should be {}",
        to.key.0,
        to.key.1,
        if got { "connected" } else { "was refused" },
        if want { "allowed" } else { "denied" }
    );
    Ok(())
}

fn udp(from: &Netns, to: &Pod, port: u16, want: bool, what: &str) -> Result<()> {
    let got = udp_ok(
        from,
        &to.ns,
        to.ip,
        port,
        if want { ALLOWED } else { DENIED },
    )?;
    ensure!(
        got == want,
        "{what}: UDP to {}/{}:{port}: arrived={got}, want {want}",
        to.key.0,
        to.key.1
    );
    Ok(())
}

/// `weft cni flows -o json` running in the node namespace, its lines collected.
struct FlowsCli {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl FlowsCli {
    fn start(node: &Netns) -> Result<FlowsCli> {
        let weft = workspace_bin("weft", "weft-cli");
        let mut child = node
            .command(weft)?
            .args(["cni", "flows", "--agent", "127.0.0.1:9964", "-o", "json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawn weft cni flows")?;
        let out = child.stdout.take().context("stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    l.lock().expect("lock").push(v);
                }
            }
        });
        Ok(FlowsCli { child, lines })
    }

    /// Runs `probe` (a connection that yields a flow) until a flow is printed: the agent
    /// fans flows out only to clients already connected, so flows from before the CLI
    /// subscribed are not in its stream.
    fn wait_subscribed(&self, probe: impl Fn() -> Result<()>) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            probe()?;
            std::thread::sleep(Duration::from_millis(200));
            if !self.lines.lock().expect("lock").is_empty() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "weft cni flows printed no flow within 10s"
            );
        }
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Some(v) = self.lines.lock().expect("lock").iter().find(|v| pred(v)) {
                return Ok(v.clone());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let seen = self.lines.lock().expect("lock").len();
        anyhow::bail!("no {what} flow among {seen} from weft cni flows")
    }
}

impl Drop for FlowsCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn policy_matrix_live_edit_proxy_port_node_restart_metrics_and_flows() -> Result<()> {
    if !require_root("policy_matrix") {
        return Ok(());
    }
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let tmp = tempfile::tempdir()?;
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    write_manifest(&manifests, "pods.yaml", PODS)?;
    write_manifest(&manifests, "policies.yaml", &policies(80))?;
    let pins = PinDir::new();
    let dirs = AgentDirs {
        manifests: manifests.clone(),
        pin_dir: pins.0.clone(),
        state_dir: tmp.path().join("state"),
        socket: tmp.path().join("cni.sock"),
        log: tmp.path().join("agent.log"),
    };
    let node = node_ns()?;
    let mut agent = Agent::start(&node, &dirs)?;
    let hl = HostLocal::new()?;
    let conf = plugin_conf(&dirs.socket, hl.ipam("10.77.0.0/24"));

    let web = add_pod(&node, &plugin, &conf, ("alpha", "web"))?;
    let client = add_pod(&node, &plugin, &conf, ("alpha", "client"))?;
    let api = add_pod(&node, &plugin, &conf, ("beta", "api"))?;
    let _servers = [
        tcp_server(&web.ns, web.ip, 80)?,
        tcp_server(&web.ns, web.ip, 81)?,
        tcp_server(&client.ns, client.ip, 80)?,
        tcp_server(&api.ns, api.ip, 8080)?,
        tcp_server(&api.ns, api.ip, 4143)?,
        tcp_server(&api.ns, api.ip, 9090)?,
    ];
    let flows = FlowsCli::start(&node)?;
    flows.wait_subscribed(|| tcp(&node, &web, 81, true, "the node reaches an isolated pod"))?;

    // The matrix.
    tcp(&client.ns, &web, 80, true, "allow-client-web")?;
    tcp(&client.ns, &web, 81, false, "port not allowed")?;
    tcp(&api.ns, &web, 80, false, "beta/api is not alpha's client")?;
    tcp(&web.ns, &client, 80, false, "alpha default-deny")?;
    tcp(&client.ns, &api, 8080, true, "namespaceSelector team=alpha")?;
    tcp(
        &client.ns,
        &api,
        4143,
        true,
        "the proxy's inbound port goes with 8080",
    )?;
    tcp(&client.ns, &api, 9090, false, "api's other ports")?;
    udp(&client.ns, &web, 5353, true, "UDP 5353 allowed")?;
    udp(&client.ns, &web, 5354, false, "UDP 5354 not")?;
    tcp(&node, &web, 81, true, "the node reaches an isolated pod")?;
    tcp(&node, &client, 80, true, "the node reaches an isolated pod")?;

    // Flows, named.
    let allowed = flows.wait_for("allowed client→web", |v| {
        v["verdict"] == "allow"
            && v["src"]["pod"] == "client"
            && v["dst"]["pod"] == "web"
            && v["policy"] == "alpha/allow-client-web"
            && v["protocol"] == "TCP"
            && v["dst"]["port"] == 80
    })?;
    let denied = flows.wait_for("denied web→client", |v| {
        v["verdict"] == "deny"
            && v["src"]["pod"] == "web"
            && v["dst"]["pod"] == "client"
            && v["isolated_by"]
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p == "alpha/default-deny"))
    })?;
    eprintln!("flows: {allowed}\n       {denied}");
    drop(flows);

    // Metrics moved and pass promtool.
    let (code, text) = http_get(&node, IpAddr::from([127, 0, 0, 1]), "/metrics")?;
    ensure!(code == 200, "/metrics answered {code}");
    let at_least = |series: &str, n: f64| -> Result<()> {
        let v = metric(&text, series);
        ensure!(
            v.is_some_and(|v| v >= n),
            "{series} = {v:?}, want >= {n}\n{text}"
        );
        Ok(())
    };
    at_least(
        "weft_cni_policy_allowed_connections_total{policy=\"alpha/allow-client-web\"}",
        2.0,
    )?;
    at_least(
        "weft_cni_policy_allowed_connections_total{policy=\"node\"}",
        2.0,
    )?;
    at_least(
        "weft_cni_denied_connections_total{namespace=\"alpha\",pod=\"web\",direction=\"ingress\"}",
        2.0,
    )?;
    at_least(
        "weft_cni_policy_denied_connections_total{policy=\"alpha/default-deny\"}",
        3.0,
    )?;
    at_least("weft_cni_endpoints", 3.0)?;
    at_least("weft_cni_policy_updates_total", 3.0)?;
    promtool(&text)?;
    let (code, _) = http_get(&node, IpAddr::from([10, 250, 0, 1]), "/flows")?;
    ensure!(
        code == 403,
        "/flows from a non-loopback address answered {code}"
    );

    // A live edit: web's allowed TCP port moves from 80 to 81.
    let t0 = Instant::now();
    write_manifest(&manifests, "policies.yaml", &policies(81))?;
    let took = loop {
        if tcp_ok(&client.ns, web.ip, 81, Duration::from_millis(50))? {
            break t0.elapsed();
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(3),
            "the edit was not enforced within 3 s"
        );
    };
    eprintln!(
        "policy edit enforced for new connections after {} ms",
        took.as_millis()
    );
    ensure!(
        took < Duration::from_secs(1),
        "edit took {took:?}, more than 1 s"
    );
    tcp(
        &client.ns,
        &web,
        80,
        false,
        "80 no longer allowed after the edit",
    )?;

    // Restart: the pinned maps enforce while the agent is down; the new agent keeps the
    // endpoints (a later edit still reaches them).
    agent.stop();
    tcp(&client.ns, &web, 81, true, "agent down: policy kept")?;
    tcp(&client.ns, &web, 80, false, "agent down: policy kept")?;
    // A DEL the agent does not hear (it is down): the plugin goes on, the restarted agent
    // collects the endpoint whose interface is gone.
    let (code, out) = cni(
        &node,
        &plugin,
        "DEL",
        &api.cid,
        &api.ns.path(),
        api.key,
        &conf,
    )?;
    ensure!(code == 0, "DEL with the agent down: {out}");
    let agent = Agent::start(&node, &dirs)?;
    let (_, text) = http_get(&node, IpAddr::from([127, 0, 0, 1]), "/metrics")?;
    ensure!(
        metric(&text, "weft_cni_endpoints") == Some(2.0),
        "endpoints after restart (web and client; api collected):\n{text}"
    );
    {
        use weft_datapath::PolicyMaps;
        let eps = weft_datapath::Datapath::open(&pins.0)?.endpoints()?;
        ensure!(eps.len() == 2, "datapath endpoints after restart: {eps:?}");
    }
    write_manifest(&manifests, "policies.yaml", &policies(80))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !tcp_ok(&client.ns, web.ip, 80, Duration::from_millis(50))? {
        ensure!(
            Instant::now() < deadline,
            "restarted agent did not apply an edit"
        );
    }
    tcp(&node, &web, 81, true, "node after restart")?;

    // DEL everything through the plugin.
    for p in [&web, &client, &api] {
        let (code, out) = cni(&node, &plugin, "DEL", &p.cid, &p.ns.path(), p.key, &conf)?;
        ensure!(code == 0, "DEL {:?}: {out}", p.key);
    }
    let dp = weft_datapath::Datapath::open(&pins.0)?;
    use weft_datapath::PolicyMaps;
    ensure!(
        dp.endpoints()?.is_empty(),
        "endpoints left: {:?}",
        dp.endpoints()?
    );
    ensure!(dp.policy_entry_counts()? == (0, 0), "policy entries left");
    drop(agent);
    Ok(())
}

fn promtool(text: &str) -> Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("promtool is not installed (scripts/setup.sh)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn add_del_cycles_through_the_plugin_leave_nothing_behind() -> Result<()> {
    if !require_root("add_del_cycles") {
        return Ok(());
    }
    // The issue's figure: 1,000 cycles through the real plugin and agent leave nothing behind.
    const CYCLES: usize = 1000;
    let plugin = workspace_bin("weft-cni", "weft-cni");
    let tmp = tempfile::tempdir()?;
    let manifests = tmp.path().join("manifests");
    std::fs::create_dir(&manifests)?;
    // Every pod of "cycle" is isolated, so each ADD writes policy entries.
    write_manifest(
        &manifests,
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: cycle}\nspec: {podSelector: {}}\n",
    )?;
    let pins = PinDir::new();
    let dirs = AgentDirs {
        manifests,
        pin_dir: pins.0.clone(),
        state_dir: tmp.path().join("state"),
        socket: tmp.path().join("cni.sock"),
        log: tmp.path().join("agent.log"),
    };
    let node = node_ns()?;
    let agent = Agent::start(&node, &dirs)?;
    let hl = HostLocal::new()?;
    let conf = plugin_conf(&dirs.socket, hl.ipam("10.78.0.0/24"));
    let pod = Netns::new("cycler")?;
    let _server = tcp_server(&pod, IpAddr::from([0, 0, 0, 0]), 80)?;
    let start = Instant::now();
    for i in 0..CYCLES {
        let cid = format!("cycle-{i}");
        let (code, out) = cni(
            &node,
            &plugin,
            "ADD",
            &cid,
            &pod.path(),
            ("cycle", "p"),
            &conf,
        )?;
        ensure!(code == 0, "ADD #{i}: {out}");
        if i % 100 == 0 {
            // Some traffic, so conntrack has entries to clean up.
            let ip = result_ip(&out)?;
            ensure!(
                tcp_ok(&node, ip, 80, ALLOWED)?,
                "cycle {i}: node cannot reach the pod"
            );
        }
        let (code, out) = cni(
            &node,
            &plugin,
            "DEL",
            &cid,
            &pod.path(),
            ("cycle", "p"),
            &conf,
        )?;
        ensure!(code == 0, "DEL #{i}: {out}");
    }
    eprintln!(
        "{CYCLES} ADD/DEL cycles through the plugin and agent in {:?}",
        start.elapsed()
    );

    nothing_left(&pins, &dirs.state_dir)?;
    let dp = weft_datapath::Datapath::open(&pins.0)?;
    for ep in 1..=(CYCLES as u32 + 1) {
        let ct = dp.conntrack(ep)?;
        ensure!(
            ct.is_empty(),
            "conntrack entries left for endpoint {ep}: {}",
            ct.len()
        );
    }
    let links = node.links()?;
    ensure!(
        links == vec!["lo".to_string()],
        "interfaces left on the node: {links:?}"
    );
    ensure!(hl.leases()?.is_empty(), "leases left: {:?}", hl.leases()?);
    drop(agent);
    Ok(())
}
