//! Prometheus, for real (issue 15): the chart's recording rules pass `promtool check rules`
//! and their unit tests, the chart's scrape config passes `promtool check config`, and Debian's
//! Prometheus server scrapes a running mesh on loopback through the chart's own relabelling
//! and records the golden signals with the chart's own rules; what it answers is checked
//! against what the proxies count on their `/metrics`.
//!
//! The mesh: a controller (`--source dir:`), a client proxy `web` that resolves
//! `books.demo.svc.cluster.local:8080` and `authors.demo.svc.cluster.local:8080` through it,
//! and a server proxy `books` in front of one HTTP app that serves both names.
//!
//! Kubernetes discovery is simulated: Debian builds Prometheus without it, so each job's
//! `kubernetes_sd_configs` becomes `static_configs` whose targets carry the
//! `__meta_kubernetes_*` labels the pod role would give those pods, and the chart's
//! `relabel_configs` run on them unchanged (decoy targets prove what they drop).
//!
//! Needs `cargo build -p weft-proxy -p weft-controller`, and `prometheus` and `promtool`
//! (Debian's `prometheus` package, scripts/setup.sh): without them the tests print a notice
//! and pass, except under `CI=true`, where they fail.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use weft_e2e::client::Conn;
use weft_e2e::controller::{Controller, ManifestDir};
use weft_e2e::servers::http_server;
use weft_e2e::{admin_get, eventually_async, free_addr, Metrics, Proxy, ProxyOpts};

/// The chart's directory.
fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft")
}

/// The recording rules' rate window in seconds (`[1m]` in rules/weft.rules.yaml).
const WINDOW: f64 = 60.0;

/// The path of `name` on PATH; `None` (after a notice) when missing, so the test passes; an
/// error when missing under `CI=true`.
fn tool(name: &str) -> Result<Option<PathBuf>> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    if let Some(p) = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        return Ok(Some(p));
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        bail!(
            "{name} is not installed and CI=true: run scripts/setup.sh (Debian package prometheus)"
        );
    }
    eprintln!(
        "skipping: {name} is not installed; scripts/setup.sh installs Debian's prometheus package"
    );
    Ok(None)
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))
}

/// Runs `cmd`, failing with its output unless it succeeds.
fn succeed(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed:\n{text}");
    Ok(text)
}

#[test]
fn recording_rules_pass_promtool_check_and_their_unit_tests() -> Result<()> {
    let Some(promtool) = tool("promtool")? else {
        return Ok(());
    };
    let rules = chart().join("rules");
    let out = succeed(
        Command::new(&promtool)
            .args(["check", "rules", "weft.rules.yaml"])
            .current_dir(&rules),
    )?;
    ensure!(out.contains("SUCCESS: 3 rules found"), "{out}");
    // The unit tests feed input series and compare every rule's output (rule_files is relative
    // to the test file).
    let out = succeed(
        Command::new(&promtool)
            .args(["test", "rules", "weft.rules.test.yaml"])
            .current_dir(&rules),
    )?;
    ensure!(out.contains("SUCCESS"), "{out}");

    // The chart ships this very file: the rules template wraps it, nothing else.
    let template = std::fs::read_to_string(chart().join("templates/prometheus-rules.yaml"))?;
    let wrapped: Vec<&str> = template
        .match_indices(".Files.Get \"")
        .map(|(i, m)| {
            let rest = &template[i + m.len()..];
            &rest[..rest.find('"').unwrap_or(0)]
        })
        .collect();
    ensure!(
        !wrapped.is_empty() && wrapped.iter().all(|f| *f == "rules/weft.rules.yaml"),
        "prometheus-rules.yaml wraps {wrapped:?}"
    );
    Ok(())
}

/// A chart template rendered with the default values (every `prometheus.*` switch on, no
/// extra labels or interval) and release namespace `ns`, for the few constructs these
/// templates use: `if` (taken, and its `else` branches skipped), `with` over an empty value
/// (skipped), `.Release.Namespace`.
fn render_defaults(template: &str, ns: &str) -> Result<String> {
    // One frame per open block: whether its lines are kept.
    let mut frames: Vec<bool> = Vec::new();
    let mut out = String::new();
    for line in template.lines() {
        let t = line.trim();
        if t.starts_with("{{") && t.ends_with("}}") {
            let action = t
                .trim_start_matches("{{")
                .trim_start_matches('-')
                .trim_start();
            let outer = frames.iter().all(|k| *k);
            if action.starts_with("if ") {
                frames.push(outer);
            } else if action.starts_with("with ") {
                frames.push(false);
            } else if action.starts_with("else") {
                // The `if` was taken: every `else` branch is skipped.
                *frames.last_mut().context("`else` outside a block")? = false;
            } else if action.starts_with("end") {
                frames.pop().context("`end` outside a block")?;
            } else if outer {
                bail!("template action this test does not render: {t}");
            }
            continue;
        }
        if frames.iter().all(|k| *k) {
            out.push_str(line);
            out.push('\n');
        }
    }
    let out = out
        .replace("{{ .Release.Namespace | quote }}", &format!("{ns:?}"))
        .replace("{{ .Release.Namespace }}", ns);
    ensure!(
        !out.contains("{{"),
        "template expressions this test does not render:\n{out}"
    );
    Ok(out)
}

/// The `prometheus.yml` of the chart's scrape-config ConfigMap, for release namespace `ns`.
fn chart_prometheus_yml(ns: &str) -> Result<String> {
    let template =
        std::fs::read_to_string(chart().join("templates/prometheus-scrape-config.yaml"))?;
    let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(&render_defaults(&template, ns)?)?;
    ensure!(cm["kind"] == "ConfigMap", "not a ConfigMap: {cm:?}");
    Ok(cm["data"]["prometheus.yml"]
        .as_str()
        .context("the ConfigMap has no data.prometheus.yml")?
        .to_string())
}

/// One container port of a pod, as Prometheus' Kubernetes discovery (role: pod) describes it.
#[derive(Debug, Clone)]
struct PodPort {
    address: SocketAddr,
    namespace: &'static str,
    pod: &'static str,
    container: &'static str,
    port_name: &'static str,
    /// The declared containerPort. The controller's job keeps 9990 by number; its target's
    /// address is wherever the test's controller listens.
    port_number: u16,
    /// The pod's controller (owner): kind and name.
    owner: Option<(&'static str, &'static str)>,
    labels: &'static [(&'static str, &'static str)],
    phase: &'static str,
}

impl PodPort {
    /// A `static_configs` entry with this port's discovery labels.
    fn static_config(&self) -> Value {
        let mut l = serde_json::Map::new();
        let meta = "__meta_kubernetes_";
        let mut put = |k: &str, v: String| {
            l.insert(format!("{meta}{k}"), Value::String(v));
        };
        put("namespace", self.namespace.into());
        put("pod_name", self.pod.into());
        put("pod_ip", self.address.ip().to_string());
        put("pod_phase", self.phase.into());
        put("pod_node_name", "node-1".into());
        put("pod_container_name", self.container.into());
        put("pod_container_init", "false".into());
        put("pod_container_port_name", self.port_name.into());
        put("pod_container_port_number", self.port_number.to_string());
        put("pod_container_port_protocol", "TCP".into());
        if let Some((kind, name)) = self.owner {
            put("pod_controller_kind", kind.into());
            put("pod_controller_name", name.into());
        }
        for (k, v) in self.labels {
            let k: String = k
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            put(&format!("pod_label_{k}"), (*v).into());
            put(&format!("pod_labelpresent_{k}"), "true".into());
        }
        json!({ "targets": [self.address.to_string()], "labels": l })
    }
}

/// The chart's Prometheus configuration for this machine's Prometheus: every job's
/// `kubernetes_sd_configs` replaced by static targets (`targets[job]`) that carry the pod
/// role's labels, the relabelling untouched; `global` and `rule_files` as given.
fn with_static_targets(
    chart_yml: &str,
    global: Option<Value>,
    rule_files: Option<Vec<String>>,
    targets: &BTreeMap<&str, Vec<PodPort>>,
) -> Result<String> {
    let mut cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(chart_yml)?;
    let top = cfg
        .as_mapping_mut()
        .context("prometheus.yml is not a mapping")?;
    if let Some(g) = global {
        top.insert("global".into(), serde_yaml_ng::to_value(g)?);
    }
    if let Some(r) = rule_files {
        top.insert("rule_files".into(), serde_yaml_ng::to_value(r)?);
    }
    let jobs = top
        .get_mut("scrape_configs")
        .and_then(|j| j.as_sequence_mut())
        .context("no scrape_configs")?;
    for job in jobs {
        let name = job["job_name"]
            .as_str()
            .context("a job without job_name")?
            .to_string();
        let job = job.as_mapping_mut().context("a job is not a mapping")?;
        let sd = job
            .remove("kubernetes_sd_configs")
            .with_context(|| format!("job {name} has no kubernetes_sd_configs"))?;
        ensure!(
            sd.as_sequence()
                .is_some_and(|s| s.len() == 1 && s[0]["role"] == "pod"),
            "job {name}: want one kubernetes_sd_configs entry with role: pod, got {sd:?}"
        );
        let statics: Vec<Value> = targets
            .get(name.as_str())
            .map(|t| t.iter().map(PodPort::static_config).collect())
            .unwrap_or_default();
        job.insert("static_configs".into(), serde_yaml_ng::to_value(statics)?);
    }
    Ok(serde_yaml_ng::to_string(&cfg)?)
}

#[test]
fn chart_scrape_config_passes_promtool_check_config() -> Result<()> {
    let Some(promtool) = tool("promtool")? else {
        return Ok(());
    };
    let dir = ManifestDir::new("promtool-config")?;
    let yml = chart_prometheus_yml("weft")?;
    let cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yml)?;
    let jobs: Vec<&str> = cfg["scrape_configs"]
        .as_sequence()
        .context("no scrape_configs")?
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .collect();
    assert_eq!(jobs, ["weft-proxies", "weft-controller", "weft-cni-agent"]);

    // As shipped: an upstream promtool checks it whole; Debian's is built without Kubernetes
    // discovery and refuses the kubernetes_sd_configs field itself.
    dir.write("prometheus.yml", &yml)?;
    let out = output(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.path().join("prometheus.yml")),
    )?;
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        ensure!(
            text.contains("field kubernetes_sd_configs not found"),
            "promtool check config failed:\n{text}"
        );
        eprintln!("this promtool has no Kubernetes discovery (Debian's build); checking the rest");
    }
    // The rest (global, rule_files, every relabel rule and regex) with static targets in
    // place of discovery: what the end-to-end test below runs.
    let port = PodPort {
        address: "10.0.0.7:4191".parse()?,
        namespace: "shop",
        pod: "web-5d8f7c9b4-x7k2p",
        container: "weft-proxy",
        port_name: "weft-admin",
        port_number: 4191,
        owner: Some(("ReplicaSet", "web-5d8f7c9b4")),
        labels: &[("app", "web")],
        phase: "Running",
    };
    let targets = BTreeMap::from([("weft-proxies", vec![port])]);
    dir.write(
        "static.yml",
        &with_static_targets(&yml, None, None, &targets)?,
    )?;
    succeed(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.path().join("static.yml")),
    )?;
    Ok(())
}

/// A relabel rule reduced to what it does, Prometheus' defaults filled in: source labels,
/// regex, replacement, target label, action.
type Relabel = (Vec<String>, String, String, String, String);

/// `r` as written in a scrape config (snake_case keys) or a PodMonitor (camelCase).
fn relabel(r: &serde_yaml_ng::Value, camel: bool) -> Relabel {
    let key =
        |snake: &'static str, camel_case: &'static str| if camel { camel_case } else { snake };
    let text = |k: &str, default: &str| r[k].as_str().unwrap_or(default).to_string();
    let sources = r[key("source_labels", "sourceLabels")]
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    (
        sources,
        text("regex", "(.*)"),
        text("replacement", "$1"),
        text(key("target_label", "targetLabel"), ""),
        text("action", "replace").to_lowercase(),
    )
}

#[test]
fn podmonitors_select_and_label_like_the_scrape_config() -> Result<()> {
    let cfg: serde_yaml_ng::Value = serde_yaml_ng::from_str(&chart_prometheus_yml("weft")?)?;
    let template = std::fs::read_to_string(chart().join("templates/podmonitor.yaml"))?;
    let rendered = render_defaults(&template, "weft")?;
    let mut names = Vec::new();
    for doc in rendered.split("\n---\n") {
        let m: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc)?;
        ensure!(m["apiVersion"] == "monitoring.coreos.com/v1" && m["kind"] == "PodMonitor");
        let name = m["metadata"]["name"]
            .as_str()
            .context("a PodMonitor without a name")?;
        names.push(name.to_string());
        let job = cfg["scrape_configs"]
            .as_sequence()
            .and_then(|jobs| jobs.iter().find(|j| j["job_name"] == name))
            .with_context(|| format!("PodMonitor {name}: no scrape job of that name"))?;

        // The same namespaces.
        let names_of = |v: &serde_yaml_ng::Value| -> Vec<String> {
            v.as_sequence()
                .map(|s| {
                    s.iter()
                        .filter_map(|n| n.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let selector = &m["spec"]["namespaceSelector"];
        let sd = &job["kubernetes_sd_configs"][0];
        if selector["any"] == true {
            ensure!(
                sd.get("namespaces").is_none(),
                "{name}: any namespace vs {sd:?}"
            );
        } else {
            assert_eq!(
                names_of(&selector["matchNames"]),
                names_of(&sd["namespaces"]["names"]),
                "{name}"
            );
        }

        // The same relabelling, but for how each says it: the PodMonitor names the port in
        // `port` and the job with a rule; the scrape config keeps the port in its first rule
        // and sets the address (the Operator does both).
        let endpoints = m["spec"]["podMetricsEndpoints"]
            .as_sequence()
            .context("no endpoints")?;
        ensure!(endpoints.len() == 1, "{name}: {endpoints:?}");
        let ep = &endpoints[0];
        assert_eq!(ep["path"], "/metrics", "{name}");
        let mut from_monitor = Vec::new();
        for r in ep["relabelings"].as_sequence().context("no relabelings")? {
            let mut r = relabel(r, true);
            if r.3 == "job" {
                assert_eq!(r.2, name, "{name}: the job label");
                continue;
            }
            if let (Some(port), true) = (ep["port"].as_str(), r.4 == "keep") {
                if r.0 == ["__meta_kubernetes_pod_container_name"] {
                    r.0.push("__meta_kubernetes_pod_container_port_name".into());
                    r.1 = format!("{};{port}", r.1);
                }
            }
            from_monitor.push(r);
        }
        let from_job: Vec<Relabel> = job["relabel_configs"]
            .as_sequence()
            .context("no relabel_configs")?
            .iter()
            .map(|r| relabel(r, false))
            .filter(|r| r.3 != "__address__")
            .collect();
        assert_eq!(
            from_monitor, from_job,
            "PodMonitor {name} against job {name}"
        );
    }
    assert_eq!(names, ["weft-proxies", "weft-controller", "weft-cni-agent"]);
    Ok(())
}

#[test]
fn the_prometheus_templates_read_only_values_that_exist() -> Result<()> {
    let values: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart().join("values.yaml"))?)?;
    let mut seen = BTreeSet::new();
    for t in ["prometheus-scrape-config", "podmonitor", "prometheus-rules"] {
        let text = std::fs::read_to_string(chart().join(format!("templates/{t}.yaml")))?;
        for (i, _) in text.match_indices(".Values.") {
            let path: String = text[i + ".Values.".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.')
                .collect();
            let mut v = &values;
            for key in path.split('.') {
                v = v.get(key).with_context(|| {
                    format!("templates/{t}.yaml reads .Values.{path}: not in values.yaml")
                })?;
            }
            seen.insert(path);
        }
    }
    // Everything off by default.
    for switch in ["scrapeConfig", "podMonitor", "rules"] {
        assert_eq!(values["prometheus"][switch]["enabled"], false, "{switch}");
        assert!(
            seen.contains(&format!("prometheus.{switch}.enabled")),
            "{switch}"
        );
    }
    Ok(())
}

/// A Prometheus server on a free loopback port with its own storage, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: ManifestDir,
}

impl Prometheus {
    fn start(bin: &Path, config: &str) -> Result<Self> {
        let dir = ManifestDir::new("prometheus")?;
        dir.write("prometheus.yml", config)?;
        let addr = free_addr()?;
        let log = dir.path().join("prometheus.log");
        let out = File::create(&log)?;
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = Self {
            child,
            addr,
            log,
            _dir: dir,
        };
        p.wait_ready(Duration::from_secs(20))?;
        Ok(p)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", self.log_tail());
            }
            if matches!(http_get(self.addr, "/-/ready"), Ok((200, _))) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "prometheus not ready within {timeout:?}:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `/api/v1/query`: the result of `expr` at `at` (Unix seconds; now when `None`).
    fn query(&self, expr: &str, at: Option<f64>) -> Result<Vec<Value>> {
        let mut path = format!("/api/v1/query?query={}", url_encode(expr));
        if let Some(t) = at {
            path.push_str(&format!("&time={t:.3}"));
        }
        let (status, body) = http_get(self.addr, &path)?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("{expr}: answer {status} is not JSON: {body}"))?;
        ensure!(v["status"] == "success", "{expr}: {body}");
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// The value of `expr`, which must give one series.
    fn scalar(&self, expr: &str, at: Option<f64>) -> Result<f64> {
        let r = self.query(expr, at)?;
        ensure!(r.len() == 1, "{expr}: want one series, got {r:?}");
        sample_value(&r[0]["value"])
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A GET in HTTP/1.0, so the answer is never chunked: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("bad status line")?;
    Ok((status, body.to_string()))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `[timestamp, "value"]` → value.
fn sample_value(v: &Value) -> Result<f64> {
    let s = v[1]
        .as_str()
        .with_context(|| format!("not a sample: {v}"))?;
    s.parse().with_context(|| format!("not a number: {s}"))
}

/// Unix seconds (as the API writes them, with milliseconds) → Unix milliseconds, the
/// resolution Prometheus stores and computes in.
fn millis(seconds: f64) -> i64 {
    (seconds * 1000.0).round() as i64
}

fn labels_of(series: &Value) -> BTreeMap<String, String> {
    series["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// One series' raw samples from a range query: (Unix milliseconds, value).
fn samples_of(series: &Value) -> Result<Vec<(i64, f64)>> {
    series["values"]
        .as_array()
        .context("not a range result")?
        .iter()
        .map(|s| {
            let t = s[0]
                .as_f64()
                .with_context(|| format!("not a sample: {s}"))?;
            Ok((millis(t), sample_value(s)?))
        })
        .collect()
}

/// Prometheus 2's `rate()` of one counter over the `WINDOW` ending at `t` (ms), from the raw
/// samples in that window (promql/functions.go, extrapolatedRate): the increase between the
/// first and last sample, extrapolated towards the window's edges (to the start no further
/// than where the counter would reach zero, and by half an average interval at most where
/// the series starts or ends inside the window), divided by the window. `None` below two
/// samples.
fn prometheus_rate(samples: &[(i64, f64)], t: i64) -> Option<f64> {
    let (first, last) = (samples.first()?, samples.last()?);
    if samples.len() < 2 {
        return None;
    }
    let mut increase = last.1 - first.1;
    let mut prev = 0.0;
    for &(_, v) in samples {
        if v < prev {
            increase += prev; // a counter reset
        }
        prev = v;
    }
    let window_start = t - (WINDOW * 1000.0) as i64;
    let mut to_start = (first.0 - window_start) as f64 / 1000.0;
    let to_end = (t - last.0) as f64 / 1000.0;
    let sampled = (last.0 - first.0) as f64 / 1000.0;
    let average = sampled / (samples.len() - 1) as f64;
    if increase > 0.0 && first.1 >= 0.0 {
        let to_zero = sampled * (first.1 / increase);
        if to_zero < to_start {
            to_start = to_zero;
        }
    }
    let threshold = average * 1.1;
    let mut interval = sampled;
    interval += if to_start < threshold {
        to_start
    } else {
        average / 2.0
    };
    interval += if to_end < threshold {
        to_end
    } else {
        average / 2.0
    };
    Some(increase * (interval / sampled) / WINDOW)
}

/// Prometheus' `histogram_quantile` over cumulative buckets (upper bound, count)
/// (promql/quantile.go, bucketQuantile).
fn bucket_quantile(q: f64, mut buckets: Vec<(f64, f64)>) -> f64 {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    if buckets.len() < 2 || buckets.last().is_some_and(|b| b.0 != f64::INFINITY) {
        return f64::NAN;
    }
    // Rates of cumulative buckets can come out slightly non-monotonic.
    let mut max = f64::NEG_INFINITY;
    for b in &mut buckets {
        if b.1 > max {
            max = b.1;
        } else {
            b.1 = max;
        }
    }
    let n = buckets.len();
    let observations = buckets[n - 1].1;
    if observations == 0.0 {
        return f64::NAN;
    }
    let mut rank = q * observations;
    let b = buckets[..n - 1]
        .iter()
        .position(|b| b.1 >= rank)
        .unwrap_or(n - 1);
    if b == n - 1 {
        return buckets[n - 2].0;
    }
    if b == 0 && buckets[0].0 <= 0.0 {
        return buckets[0].0;
    }
    let (mut start, end, mut count) = (0.0, buckets[b].0, buckets[b].1);
    if b > 0 {
        start = buckets[b - 1].0;
        count -= buckets[b - 1].1;
        rank -= buckets[b - 1].1;
    }
    start + (end - start) * (rank / count)
}

/// The bucket (lower, upper bound) a value falls in, among `buckets`' upper bounds.
fn bucket_of(x: f64, buckets: &[(f64, f64)]) -> (f64, f64) {
    let upper = buckets
        .iter()
        .map(|b| b.0)
        .filter(|le| *le >= x)
        .fold(f64::INFINITY, f64::min);
    let lower = buckets
        .iter()
        .map(|b| b.0)
        .filter(|le| *le < x)
        .fold(0.0, f64::max);
    (lower, upper)
}

fn parse_le(le: &str) -> f64 {
    if le == "+Inf" {
        f64::INFINITY
    } else {
        le.parse().unwrap_or(f64::NAN)
    }
}

/// Equal but for the order of floating-point sums.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1e-12)
}

const NS: &str = "demo";
const BOOKS: &str = "books.demo.svc.cluster.local:8080";
const AUTHORS: &str = "authors.demo.svc.cluster.local:8080";
const WEB_POD: &str = "web-5d8f7c9b4-x7k2p";
const BOOKS_POD: &str = "books-0";
const CONTROLLER_POD: &str = "weft-controller-7c9d8b6f5d-q4wz8";
const AGENT_POD: &str = "weft-cni-agent-x7k2p";
const DURATION: &str = "weft_http_response_duration_seconds_bucket";

/// What one proxy served for one authority in one direction.
#[derive(Debug, Clone)]
struct View {
    pod: &'static str,
    workload: &'static str,
    direction: &'static str,
    authority: &'static str,
    /// Responses of the load phase (after priming): successes, failures.
    load: (u64, u64),
}

impl View {
    /// The raw series' selector.
    fn selector(&self) -> String {
        format!(
            "job=\"weft-proxies\",pod=\"{}\",direction=\"{}\",authority=\"{}\"",
            self.pod, self.direction, self.authority
        )
    }

    /// The recorded series' selector.
    fn rule_selector(&self) -> String {
        format!(
            "namespace=\"{NS}\",workload=\"{}\",direction=\"{}\",authority=\"{}\"",
            self.workload, self.direction, self.authority
        )
    }

    /// The sum of `metric`'s samples for this view on the proxy's `/metrics`, with `extra`
    /// labels.
    fn counted(&self, m: &Metrics, metric: &str, extra: Option<(&str, &str)>) -> f64 {
        let mut labels = vec![("direction", self.direction), ("authority", self.authority)];
        labels.extend(extra);
        m.sum(metric, &labels)
    }

    /// The proxy's cumulative latency buckets (all classifications) at these `le`s, by upper
    /// bound.
    fn buckets(&self, m: &Metrics, les: &BTreeSet<String>) -> Vec<(f64, f64)> {
        let mut b: Vec<(f64, f64)> = les
            .iter()
            .map(|le| (parse_le(le), self.counted(m, DURATION, Some(("le", le)))))
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}

/// One round of requests per authority, with known answers: books 3 slow 200s (30 ms) and a
/// 500; authors 8 fast 200s, a 404 (a success) and a 503.
fn round(authority: &str) -> Vec<(&'static str, u16)> {
    if authority == BOOKS {
        vec![
            ("/slow?ms=30", 200),
            ("/slow?ms=30", 200),
            ("/slow?ms=30", 200),
            ("/status/500", 500),
        ]
    } else {
        let mut r = vec![("/", 200); 8];
        r.extend([("/status/404", 404), ("/status/503", 503)]);
        r
    }
}

/// Sends `rounds` rounds to `authority` through the client proxy on one connection, checking
/// every status.
async fn send(proxy: SocketAddr, authority: &'static str, rounds: usize) -> Result<()> {
    let mut conn = Conn::open(proxy, false).await?;
    for _ in 0..rounds {
        for (path, want) in round(authority) {
            let (status, err, _) = conn.get(authority, path).await?;
            ensure!(
                status == want && err.is_empty(),
                "{authority}{path}: {status} {err:?}, want {want}"
            );
        }
    }
    Ok(())
}

/// Ok(true) when Prometheus holds, for every view, the requests, the responses by
/// classification and the latency buckets the proxies' `/metrics` showed (`counted`); else an
/// error naming the first difference.
fn scraped_equals_counted(
    prom: &Prometheus,
    views: &[View],
    counted: &BTreeMap<&str, Metrics>,
) -> Result<bool> {
    for v in views {
        let m = &counted[v.pod];
        let sel = v.selector();
        let mut checks = vec![(
            format!("sum(weft_http_requests_total{{{sel}}})"),
            v.counted(m, "weft_http_requests_total", None),
        )];
        for class in ["success", "failure"] {
            checks.push((
                format!("sum(weft_http_responses_total{{{sel},classification=\"{class}\"}})"),
                v.counted(
                    m,
                    "weft_http_responses_total",
                    Some(("classification", class)),
                ),
            ));
        }
        for (expr, want) in checks {
            let got = match prom.query(&expr, None)?.first() {
                Some(s) => sample_value(&s["value"])?,
                None => bail!("{expr}: no series yet (the proxy counts {want})"),
            };
            ensure!(got == want, "{expr} = {got}, the proxy counts {want}");
        }
        let buckets = prom.query(&format!("sum by (le) ({DURATION}{{{sel}}})"), None)?;
        // The proxy's 18 buckets and +Inf.
        ensure!(buckets.len() == 19, "{sel}: {} buckets", buckets.len());
        for b in &buckets {
            let le = labels_of(b)["le"].clone();
            let got = sample_value(&b["value"])?;
            let want = v.counted(m, DURATION, Some(("le", &le)));
            ensure!(
                got == want,
                "{sel} le={le}: scraped {got}, the proxy counts {want}"
            );
        }
    }
    Ok(true)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn promtool_check_metrics(promtool: &Path, what: &str, text: &str) -> Result<()> {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics on the {what}'s /metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The traffic, at once: 20 rounds to books on 4 connections (60 slow 200s, 20 500s), 5 to
/// authors on 5 (45 successes, 5 503s).
async fn load(proxy: SocketAddr) -> Result<()> {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(send(proxy, BOOKS, 5)));
    }
    for _ in 0..5 {
        tasks.push(tokio::spawn(send(proxy, AUTHORS, 1)));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The CNI node agent, run as a node's DaemonSet pod would be, on the host's own network
/// namespace with its metrics on a loopback port, watching the test's manifest directory. It
/// loads its eBPF programs when it starts, so it needs root: without root it is left out with
/// a notice, except under `CI=true` (CI runs as root), where that fails.
struct CniAgent {
    child: Child,
    metrics: SocketAddr,
    pins: PathBuf,
    dir: PathBuf,
}

impl CniAgent {
    fn start(manifests: &Path) -> Result<Option<CniAgent>> {
        if !weft_netns_testing::require_root(
            "prometheus_scrapes_the_mesh_and_records_the_golden_signals (CNI agent target)",
            "the CNI agent loads eBPF programs",
        ) {
            return Ok(None);
        }
        let tag = weft_netns_testing::unique("wprom", "agent");
        let dir = std::env::temp_dir().join(&tag);
        std::fs::create_dir_all(&dir)?;
        let pins = PathBuf::from("/sys/fs/bpf").join(&tag);
        let metrics = free_addr()?;
        let log = File::create(dir.join("agent.log"))?;
        let child = Command::new(weft_e2e::bin("weft-cni-agent")?)
            .arg("--source")
            .arg(format!("dir:{}", manifests.display()))
            .args(["--node", "node-1", "--pin-dir"])
            .arg(&pins)
            .arg("--socket")
            .arg(dir.join("cni.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning weft-cni-agent (cargo build -p weft-cni-agent)")?;
        let agent = CniAgent {
            child,
            metrics,
            pins,
            dir,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !matches!(admin_get(metrics, "/metrics"), Ok((200, _))) {
            ensure!(
                std::time::Instant::now() < deadline,
                "weft-cni-agent did not serve /metrics within 20 s:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Some(agent))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for CniAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- weft-cni-agent log ---\n{}", self.log());
        }
        // Pins are files in bpffs: removing them unloads what nothing else holds.
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The proxies' `/metrics`, by pod.
fn counted(web: &Proxy, books: &Proxy) -> Result<BTreeMap<&'static str, Metrics>> {
    Ok(BTreeMap::from([
        (WEB_POD, web.metrics()?),
        (BOOKS_POD, books.metrics()?),
    ]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_mesh_and_records_the_golden_signals() -> Result<()> {
    let (Some(prometheus_bin), Some(promtool)) = (tool("prometheus")?, tool("promtool")?) else {
        return Ok(());
    };

    // The mesh: web proxy (outbound, discovery from the controller) → books proxy (inbound) →
    // app, which serves both names.
    let (app, _) = http_server().await?;
    let books = Proxy::start(ProxyOpts {
        inbound_target: Some(app),
        ..Default::default()
    })?;
    let dir = ManifestDir::new("prometheus-mesh")?;
    dir.service(NS, "books", "10.96.0.20", 8080, &[books.inbound])?;
    dir.service(NS, "authors", "10.96.0.21", 8080, &[books.inbound])?;
    let controller = Controller::start(dir.path())?;
    controller.wait_objects("Service", 2.0)?;
    let agent = CniAgent::start(dir.path())?;
    let web = Proxy::start(ProxyOpts {
        // Where a request would go before its name is resolved: the same pod.
        outbound_target: Some(books.inbound),
        env: vec![
            controller.env(),
            ("WEFT_PROXY_NAMESPACE".into(), NS.into()),
            ("WEFT_PROXY_POD_NAME".into(), WEB_POD.into()),
            ("WEFT_PROXY_SERVICE_ACCOUNT".into(), "web".into()),
        ],
        ..Default::default()
    })?;

    // Priming, before Prometheus starts: the same requests as the load create every series
    // the load will move (each status code, each latency bucket), so Prometheus' first sample
    // of each holds the priming whole (a series born between two scrapes would lose its first
    // requests to rate(); one scraped mid-round would start from part of it). The same
    // requests with the same answers as the load, so that rate() extrapolates every request
    // and response series alike: all are younger than the window, and one whose first value is
    // small next to its increase is extrapolated less (towards where it would have been zero),
    // which would tilt successes against failures. (Latency buckets still tilt a little:
    // latencies wander between priming and load; see the p99 check.)
    load(web.outbound).await?;
    let primed = counted(&web, &books)?;

    // The chart's jobs, with discovery simulated. Decoys the relabelling must drop: the app
    // container's port, the proxy's inbound port, the admin port of a pod that has finished.
    let closed = free_addr()?;
    type Owner = Option<(&'static str, &'static str)>;
    type Labels = &'static [(&'static str, &'static str)];
    let proxy_port =
        |address: SocketAddr, pod: &'static str, owner: Owner, labels: Labels, phase| PodPort {
            address,
            namespace: NS,
            pod,
            container: "weft-proxy",
            port_name: "weft-admin",
            port_number: address.port(),
            owner,
            labels,
            phase,
        };
    let web_port = proxy_port(
        web.admin,
        WEB_POD,
        Some(("ReplicaSet", "web-5d8f7c9b4")),
        // The owner wins over the app label: workload="web".
        &[("app", "web-frontend"), ("pod-template-hash", "5d8f7c9b4")],
        "Running",
    );
    let targets = BTreeMap::from([
        (
            "weft-proxies",
            vec![
                web_port.clone(),
                // A bare pod: app.kubernetes.io/name wins over app: workload="books".
                proxy_port(
                    books.admin,
                    BOOKS_POD,
                    None,
                    &[("app", "books-legacy"), ("app.kubernetes.io/name", "books")],
                    "Running",
                ),
                PodPort {
                    address: closed,
                    container: "web",
                    port_name: "http",
                    port_number: closed.port(),
                    ..web_port.clone()
                },
                PodPort {
                    address: closed,
                    port_name: "weft-inbound",
                    port_number: closed.port(),
                    ..web_port.clone()
                },
                proxy_port(
                    closed,
                    "report-28930211-abcde",
                    Some(("Job", "report-28930211")),
                    &[],
                    "Succeeded",
                ),
            ],
        ),
        (
            "weft-controller",
            vec![PodPort {
                address: controller.admin,
                namespace: "weft",
                pod: CONTROLLER_POD,
                container: "weft-controller",
                port_name: "admin",
                port_number: 9990,
                owner: Some(("ReplicaSet", "weft-controller-7c9d8b6f5d")),
                labels: &[("app.kubernetes.io/name", "weft-controller")],
                phase: "Running",
            }],
        ),
        // The agent's port is the chart's 9964 by number; its target's address is wherever
        // the test's agent listens. A decoy: another container's 9964.
        (
            "weft-cni-agent",
            agent
                .iter()
                .flat_map(|a| {
                    let port = PodPort {
                        address: a.metrics,
                        namespace: "weft",
                        pod: AGENT_POD,
                        container: "weft-cni-agent",
                        port_name: "metrics",
                        port_number: 9964,
                        owner: Some(("DaemonSet", "weft-cni-agent")),
                        labels: &[("app.kubernetes.io/name", "weft-cni-agent")],
                        phase: "Running",
                    };
                    [
                        port.clone(),
                        PodPort {
                            address: closed,
                            container: "install-cni",
                            ..port
                        },
                    ]
                })
                .collect(),
        ),
    ]);
    let rules = chart().join("rules/weft.rules.yaml").canonicalize()?;
    let config = with_static_targets(
        &chart_prometheus_yml("weft")?,
        Some(json!({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})),
        Some(vec![rules.display().to_string()]),
        &targets,
    )?;
    let prom = Prometheus::start(&prometheus_bin, &config)?;

    // Every target up with the labels the relabelling derives, and no decoy.
    let mut want_up = BTreeMap::from([
        (web.admin.to_string(), ("weft-proxies", NS, WEB_POD, "web")),
        (
            books.admin.to_string(),
            ("weft-proxies", NS, BOOKS_POD, "books"),
        ),
        (
            controller.admin.to_string(),
            ("weft-controller", "weft", CONTROLLER_POD, "weft-controller"),
        ),
    ]);
    if let Some(a) = &agent {
        want_up.insert(
            a.metrics.to_string(),
            ("weft-cni-agent", "weft", AGENT_POD, "weft-cni-agent"),
        );
    }
    let mut up = Vec::new();
    eventually_async(Duration::from_secs(15), || {
        up = prom.query("up", None)?;
        Ok(up.len() == want_up.len()
            && up
                .iter()
                .all(|s| sample_value(&s["value"]).is_ok_and(|v| v == 1.0)))
    })
    .await
    .with_context(|| format!("not every target is up: {up:?}"))?;
    let up_at = unix_now();
    for s in &up {
        let l = labels_of(s);
        let (job, namespace, pod, workload) = want_up[&l["instance"]];
        let mut want = BTreeMap::from(
            [
                ("__name__", "up"),
                ("instance", l["instance"].as_str()),
                ("job", job),
                ("namespace", namespace),
                ("pod", pod),
                ("workload", workload),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        // The agent's job also names the node its pod runs on.
        if job == "weft-cni-agent" {
            want.insert("node".into(), "node-1".into());
        }
        assert_eq!(l, want, "target labels");
    }
    // The controller's own metrics arrive, and pass promtool (as do the proxies').
    let index = "weft_controller_index_objects{job=\"weft-controller\",kind=\"Service\"}";
    eventually_async(Duration::from_secs(5), || {
        Ok(prom.query(&format!("{index} == 2"), None)?.len() == 1)
    })
    .await
    .with_context(|| format!("{index} never reached 2 in Prometheus"))?;
    let (_, text) = admin_get(controller.admin, "/metrics")?;
    promtool_check_metrics(&promtool, "controller", &text)?;
    // The agent's too: its endpoint gauge (no pods on this node) arrives, and its /metrics
    // passes promtool.
    if let Some(a) = &agent {
        let endpoints = "weft_cni_endpoints{job=\"weft-cni-agent\",node=\"node-1\"}";
        eventually_async(Duration::from_secs(5), || {
            Ok(prom.query(&format!("{endpoints} == 0"), None)?.len() == 1)
        })
        .await
        .with_context(|| format!("{endpoints} never arrived in Prometheus"))?;
        let (_, text) = admin_get(a.metrics, "/metrics")?;
        promtool_check_metrics(&promtool, "CNI agent", &text)?;
    }
    for (what, p) in [("web proxy", &web), ("books proxy", &books)] {
        let (_, text) = admin_get(p.admin, "/metrics")?;
        promtool_check_metrics(&promtool, what, &text)?;
    }

    let views = [
        View {
            pod: WEB_POD,
            workload: "web",
            direction: "outbound",
            authority: BOOKS,
            load: (60, 20),
        },
        View {
            pod: WEB_POD,
            workload: "web",
            direction: "outbound",
            authority: AUTHORS,
            load: (45, 5),
        },
        View {
            pod: BOOKS_POD,
            workload: "books",
            direction: "inbound",
            authority: BOOKS,
            load: (60, 20),
        },
        View {
            pod: BOOKS_POD,
            workload: "books",
            direction: "inbound",
            authority: AUTHORS,
            load: (45, 5),
        },
    ];
    eventually_async(Duration::from_secs(10), || {
        scraped_equals_counted(&prom, &views, &primed)
    })
    .await
    .context("the priming never reached Prometheus")?;

    load(web.outbound).await?;
    let done = counted(&web, &books)?;
    for v in &views {
        let class =
            |m: &Metrics, c| v.counted(m, "weft_http_responses_total", Some(("classification", c)));
        let ok = class(&done[v.pod], "success") - class(&primed[v.pod], "success");
        let failed = class(&done[v.pod], "failure") - class(&primed[v.pod], "failure");
        ensure!(
            (ok, failed) == (v.load.0 as f64, v.load.1 as f64),
            "{v:?}: the proxy counted {ok} successes and {failed} failures in the load"
        );
    }
    eventually_async(Duration::from_secs(10), || {
        scraped_equals_counted(&prom, &views, &done)
    })
    .await
    .context("the load never reached Prometheus")?;
    let scraped_at = unix_now();

    // The recording rules, once evaluated after the scrape that brought the last request.
    let mut rule_at = 0.0;
    eventually_async(Duration::from_secs(10), || {
        rule_at = match prom
            .query("max(timestamp(weft:request_rate))", None)?
            .first()
        {
            Some(s) => sample_value(&s["value"])?,
            None => 0.0,
        };
        // And with 3 s of samples at least, so a counter's first value (the priming, as large
        // as the load) is far enough from zero for rate() to extrapolate it by half an
        // interval like every other.
        Ok(rule_at > scraped_at && rule_at > up_at + 3.5)
    })
    .await
    .context("the recording rules were not evaluated after the last scrape")?;
    let rule_ms = millis(rule_at);

    for v in &views {
        let (rsel, sel) = (v.rule_selector(), v.selector());
        let mut recorded = [0.0; 3];
        for (i, rule) in ["weft:request_rate", "weft:success_rate", "weft:latency_p99"]
            .into_iter()
            .enumerate()
        {
            let r = prom.query(&format!("{rule}{{{rsel}}}"), Some(rule_at))?;
            ensure!(r.len() == 1, "{rule}{{{rsel}}}: {r:?}");
            let want = BTreeMap::from(
                [
                    ("__name__", rule),
                    ("namespace", NS),
                    ("workload", v.workload),
                    ("direction", v.direction),
                    ("authority", v.authority),
                ]
                .map(|(k, v)| (k.to_string(), v.to_string())),
            );
            assert_eq!(labels_of(&r[0]), want);
            recorded[i] = sample_value(&r[0]["value"])?;
        }
        let [request_rate, success_rate, p99] = recorded;

        // Each rule recomputed from the raw samples it read, as Prometheus computes it. A
        // scrape that began just before the evaluation may not have been stored yet when the
        // rule ran, so the window without its last 250 ms is accepted too.
        type Range = Vec<(BTreeMap<String, String>, Vec<(i64, f64)>)>;
        let range = |metric: &str| -> Result<Range> {
            prom.query(&format!("{metric}{{{sel}}}[1m]"), Some(rule_at))?
                .iter()
                .map(|s| Ok((labels_of(s), samples_of(s)?)))
                .collect()
        };
        let (requests, responses, buckets) = (
            range("weft_http_requests_total")?,
            range("weft_http_responses_total")?,
            range(DURATION)?,
        );
        let recompute = |late: bool| -> [f64; 3] {
            let rate = |s: &[(i64, f64)]| {
                let kept: Vec<(i64, f64)> = s
                    .iter()
                    .copied()
                    .filter(|(t, _)| !late || *t <= rule_ms - 250)
                    .collect();
                prometheus_rate(&kept, rule_ms).unwrap_or(0.0)
            };
            let requests: f64 = requests.iter().map(|(_, s)| rate(s)).sum();
            let all: f64 = responses.iter().map(|(_, s)| rate(s)).sum();
            let ok: f64 = responses
                .iter()
                .filter(|(l, _)| l["classification"] == "success")
                .map(|(_, s)| rate(s))
                .sum();
            let mut by_le: BTreeMap<&str, f64> = BTreeMap::new();
            for (l, s) in &buckets {
                *by_le.entry(l["le"].as_str()).or_default() += rate(s);
            }
            let by_le = by_le.into_iter().map(|(le, c)| (parse_le(le), c)).collect();
            [requests, ok / all, bucket_quantile(0.99, by_le)]
        };
        let variants = [recompute(false), recompute(true)];
        for (i, (name, got)) in [
            ("weft:request_rate", request_rate),
            ("weft:success_rate", success_rate),
            ("weft:latency_p99", p99),
        ]
        .into_iter()
        .enumerate()
        {
            ensure!(
                variants.iter().any(|r| close(got, r[i])),
                "{name}{{{rsel}}} = {got}, recomputed from its samples: {} or {}",
                variants[0][i],
                variants[1][i]
            );
        }

        // Against what the proxies counted. Counts: the raw counters equal the proxies' (above),
        // and increase by exactly the load in the window.
        let load = (v.load.0 + v.load.1) as f64;
        let (increase, samples) = requests.iter().fold((0.0, 0), |(inc, n), (_, s)| {
            let (first, last) = (
                s.first().map_or(0.0, |f| f.1),
                s.last().map_or(0.0, |l| l.1),
            );
            (inc + last - first, n.max(s.len()))
        });
        ensure!(
            increase == load,
            "{sel}: the samples increase by {increase}, the load was {load}"
        );
        // Rate: that load over the window, plus rate()'s extrapolation to the window's edges,
        // at most 1.1 average sample intervals at each end.
        let per_window = request_rate * WINDOW;
        let most = load * (1.0 + 2.2 / (samples as f64 - 1.0));
        ensure!(
            per_window >= load && per_window <= most,
            "{rsel}: weft:request_rate × 60 s = {per_window}, the load was {load} (at most {most} with extrapolation)"
        );
        // Success rate: the load's share, exactly: the priming sent each status as often as the
        // load, so every response series starts at the value it then grows by, and rate()
        // extrapolates them all alike.
        let known = v.load.0 as f64 / load;
        ensure!(
            (success_rate - known).abs() <= 1e-6,
            "{rsel}: weft:success_rate {success_rate}, the load's {known}"
        );
        // p99 against the proxies' own histogram of the load (their buckets now minus after
        // priming). rate() scales each bucket's increase by (S + start + end) / S (S: the
        // sampled interval, end: alike for all), where start, up to 1.1 average intervals,
        // shrinks for a series whose first value is near zero next to its increase: here the
        // buckets the priming filled differently from the load (latencies wander, outcomes do
        // not). So buckets are weighed against each other within a spread of 1 + 1.1 × avg / S,
        // which moves the 99th percentile's rank no lower than the load's p(0.99 / spread),
        // and no higher than the highest bucket the proxies ever filled.
        let les: BTreeSet<String> = buckets.iter().map(|(l, _)| l["le"].clone()).collect();
        let (now, before) = (
            v.buckets(&done[v.pod], &les),
            v.buckets(&primed[v.pod], &les),
        );
        let load_buckets: Vec<(f64, f64)> = now
            .iter()
            .zip(&before)
            .map(|(n, b)| (n.0, n.1 - b.1))
            .collect();
        let proxy_p99 = bucket_quantile(0.99, load_buckets.clone());
        // avg / S is 1 / (samples - 1).
        let bucket_samples = buckets
            .iter()
            .find(|(l, _)| l["le"] == "+Inf")
            .map(|(_, s)| s.len())
            .context("no +Inf bucket")?;
        let spread = 1.0 + 1.1 / (bucket_samples as f64 - 1.0);
        let q_low = 0.99 / spread;
        let lowest = bucket_of(bucket_quantile(q_low, load_buckets.clone()), &now).0;
        let highest = now
            .windows(2)
            .filter(|w| w[1].1 > w[0].1)
            .map(|w| w[1].0)
            .fold(now[0].0, f64::max);
        ensure!(
            p99 > lowest && p99 <= highest,
            "{rsel}: weft:latency_p99 {p99} s outside ({lowest}, {highest}] (the load's \
             p{:.1} and the highest bucket filled); the load's p99 {proxy_p99}",
            q_low * 100.0
        );
        // And the scraped histogram is the proxy's: the same quantile on both.
        let scraped_p99 = prom.scalar(
            &format!("histogram_quantile(0.99, sum by (le) ({DURATION}{{{sel}}}))"),
            None,
        )?;
        let counted_p99 = bucket_quantile(0.99, now);
        ensure!(
            close(scraped_p99, counted_p99),
            "{sel}: p99 of the scraped buckets {scraped_p99}, of the proxy's {counted_p99}"
        );

        let counted_requests = v.counted(&done[v.pod], "weft_http_requests_total", None);
        let queried_requests =
            prom.scalar(&format!("sum(weft_http_requests_total{{{sel}}})"), None)?;
        eprintln!(
            "{} {} {}: requests counted {counted_requests}, queried {queried_requests} (load \
             {load}, window increase {increase}); weft:request_rate {request_rate:.4}/s (x60 \
             {per_window:.2}); weft:success_rate {success_rate:.4} (load {known:.4}); \
             weft:latency_p99 {:.3} ms (proxies' load histogram p99 {:.3} ms, accepted \
             {:.3}..{:.3} ms)",
            v.workload,
            v.direction,
            v.authority,
            p99 * 1e3,
            proxy_p99 * 1e3,
            lowest * 1e3,
            highest * 1e3
        );
    }
    Ok(())
}

#[test]
fn rate_and_quantile_recomputations_match_promtools_answers() {
    // The values promtool computes in weft.rules.test.yaml. 15 s samples, +60 each, window
    // [60 s, 120 s]: 4/s.
    let samples: Vec<(i64, f64)> = (4..=8).map(|i| (i * 15_000, i as f64 * 60.0)).collect();
    assert!(close(prometheus_rate(&samples, 120_000).unwrap(), 4.0));
    // The p99 case: 50, 90, 98 and 100 responses within 1, 2.5, 5 and 7.5 ms.
    let b = vec![
        (0.0005, 0.0),
        (0.001, 50.0),
        (0.0025, 90.0),
        (0.005, 98.0),
        (0.0075, 100.0),
        (f64::INFINITY, 100.0),
    ];
    assert!(close(bucket_quantile(0.99, b), 0.00625));
}
