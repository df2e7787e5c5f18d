//! The Helm chart (charts/weft) checked by real Helm and against the code it deploys.
//!
//! - Helm: `tests/chart/helm.py` runs helm-sdkpy (Helm's Go library) on each variant of the
//!   values: Helm's linter (no error, no warning) and Helm's rendering (an install against a
//!   minimal in-process API server, since helm-sdkpy has no `helm template`).
//! - Kubernetes schemas: every rendered document, and every CRD in crds/, is deserialized into
//!   the k8s-openapi type of its kind (the workspace's Kubernetes version) and serialized back;
//!   the result must equal the document, so an unknown or misspelled field (which serde drops)
//!   or a wrong type fails. A kind the test does not know fails too.
//! - One source of truth: the flags the chart passes to weft-controller, weft-injector and
//!   weft-cni-agent are parsed by the binaries themselves (`<binary> <args> --help` exits 0
//!   only when every flag exists and every value parses), the ports in values.yaml are the
//!   binaries' defaults, the image names and injector defaults are `InjectConfig::default()`'s,
//!   Chart.yaml's versions are the workspace's, crds/ is exactly the generator's output.
//!
//! Needs python3 with helm-sdkpy (scripts/setup.sh installs it) and the built binaries
//! (`cargo build --bins`). Without helm-sdkpy the Helm tests print a notice and pass, except
//! under CI=true, where they fail.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

const NAMESPACE: &str = "weft-system";

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft")
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// What Helm made of one variant of the values.
struct Rendered {
    /// Lint messages (severity, path), Helm's: 1 info, 2 warning, 3 error.
    lint: Vec<(u64, String)>,
    /// The rendered templates, one JSON value per YAML document, in Helm's order.
    docs: Vec<Value>,
}

impl Rendered {
    fn kinds(&self) -> Vec<(String, String)> {
        self.docs
            .iter()
            .map(|d| (str_at(d, "/kind"), str_at(d, "/metadata/name")))
            .collect()
    }

    fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| str_at(d, "/kind") == kind && str_at(d, "/metadata/name") == name)
    }

    fn one(&self, kind: &str, name: &str) -> &Value {
        self.get(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {:?}", self.kinds()))
    }

    /// The pod spec of a Deployment or DaemonSet.
    fn pod(&self, kind: &str, name: &str) -> PodSpec {
        serde_json::from_value(self.one(kind, name)["spec"]["template"]["spec"].clone()).unwrap()
    }
}

fn str_at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Runs Helm on the chart with `overrides` merged into values.yaml. `None`: helm-sdkpy is not
/// installed and this is not CI (a notice is printed).
fn helm(overrides: Value) -> Option<Rendered> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chart/helm.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(chart_dir())
        .arg(NAMESPACE)
        .arg(overrides.to_string())
        .output();
    let out = match out {
        Ok(o) => o,
        Err(e) => return missing(&format!("python3 cannot be run: {e}")),
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(3) {
        return missing(stderr.trim());
    }
    assert!(
        out.status.success(),
        "helm.py with values {overrides} failed ({}):\n{stderr}",
        out.status
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lint = result["lint"]["Messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["Severity"].as_u64().unwrap_or(0),
                m["Path"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let manifest = result["manifest"].as_str().unwrap();
    Some(Rendered {
        lint,
        docs: yaml_docs(manifest),
    })
}

fn missing(why: &str) -> Option<Rendered> {
    assert!(
        !in_ci(),
        "CI=true and Helm is not available: {why} (scripts/setup.sh installs helm-sdkpy)"
    );
    eprintln!("SKIPPED: Helm is not available: {why} (scripts/setup.sh installs helm-sdkpy)");
    None
}

/// The non-empty documents of a multi-document YAML text, as JSON values.
fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The values variants the chart is linted and rendered with.
fn variants() -> Vec<(&'static str, Value)> {
    let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    vec![
        ("defaults", json!({})),
        ("ha", json!({"controller": {"highAvailability": true}})),
        ("cni-off", json!({"cni": {"enabled": false}})),
        (
            "cni-on",
            json!({"cni": {"enabled": true, "nodeIPs": ["192.0.2.10"]}}),
        ),
        (
            "identity-from-values",
            json!({"identity": {
                "issuer": {"crtPEM": pem, "keyPEM": "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"},
                "trustAnchors": {"pem": pem}},
                "controller": {"replicas": 2, "logJson": true},
                "injector": {"accessLog": "json", "traceCollector": "otel.monitoring:4317",
                             "traceSampling": "0.1", "opaquePorts": "3306,5432",
                             "nativeSidecar": true}}),
        ),
        (
            "cert-manager",
            json!({"identity": {
                "issuer": {"existingSecret": "weft-issuer"},
                "trustAnchors": {"existingConfigMap": "weft-trust-anchors"}},
                "injector": {"tls": {"mode": "certManager",
                                     "certManager": {"issuerRef": {"name": "weft", "kind": "ClusterIssuer"}}}},
                "prometheus": {"podMonitor": {"enabled": true, "labels": {"release": "kps"}, "interval": "15s"},
                               "rules": {"enabled": true, "kind": "PrometheusRule"}}}),
        ),
        (
            "existing-secret",
            json!({"injector": {"tls": {"mode": "existingSecret", "existingSecret": "my-tls",
                                        "caBundle": "TUlJQg=="},
                                "webhook": {"failurePolicy": "Fail"}},
                   "prometheus": {"scrapeConfig": {"enabled": true}, "rules": {"enabled": true}}}),
        ),
    ]
}

/// Every variant passes Helm's linter with no error and no warning, and renders documents
/// that are valid Kubernetes objects of the workspace's API version.
#[test]
fn helm_lint_and_kubernetes_schemas() {
    let mut crds = Vec::new();
    for entry in std::fs::read_dir(chart_dir().join("crds")).unwrap() {
        let path = entry.unwrap().path();
        crds.extend(yaml_docs(&std::fs::read_to_string(&path).unwrap()));
    }
    assert!(!crds.is_empty());
    for crd in &crds {
        validate(crd).unwrap_or_else(|e| panic!("crds/: {e}"));
    }
    for (name, overrides) in variants() {
        let Some(r) = helm(overrides) else { return };
        let bad: Vec<_> = r.lint.iter().filter(|(sev, _)| *sev >= 2).collect();
        assert!(
            bad.is_empty(),
            "variant {name}: helm lint reported warnings (2) or errors (3) in {bad:?}; \
             helm-sdkpy does not return the message texts: run `helm lint charts/weft` with \
             these values to read them"
        );
        for doc in &r.docs {
            validate(doc).unwrap_or_else(|e| panic!("variant {name}: {e}"));
        }
        eprintln!(
            "variant {name}: lint clean, {} documents valid",
            r.docs.len()
        );
    }
}

/// A helm-sdkpy failure (a value the schema refuses, a `required` value left out) names the
/// value, so a user sees what to fix.
#[test]
fn schema_and_required_values_refuse_bad_input() {
    for (overrides, expect) in [
        (
            json!({"injector": {"tls": {"mode": "bogus"}}}),
            "/injector/tls/mode",
        ),
        (
            json!({"controller": {"replicas": 0}}),
            "/controller/replicas",
        ),
        (json!({"controller": {"typo": 1}}), "typo"),
        (json!({"cni": {"metricsPort": 70000}}), "/cni/metricsPort"),
        (
            json!({"injector": {"tls": {"mode": "certManager"}}}),
            "injector.tls.certManager.issuerRef.name",
        ),
        (
            json!({"identity": {"issuer": {"existingSecret": "x"}}}),
            "identity.trustAnchors",
        ),
    ] {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("chart/helm.py");
        let Ok(out) = Command::new("python3")
            .arg(&script)
            .arg(chart_dir())
            .arg(NAMESPACE)
            .arg(overrides.to_string())
            .output()
        else {
            missing("python3 cannot be run");
            return;
        };
        if out.status.code() == Some(3) {
            missing(String::from_utf8_lossy(&out.stderr).trim());
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expect),
            "values {overrides}: expected a failure naming {expect:?}, got {}:\n{stderr}",
            out.status
        );
    }
}

/// Deserializes `doc` into the typed struct of its kind and requires the value to serialize
/// back to the same JSON (k8s-openapi ignores unknown fields; this makes them fail).
fn validate(doc: &Value) -> Result<(), String> {
    let api = str_at(doc, "/apiVersion");
    let kind = str_at(doc, "/kind");
    let name = str_at(doc, "/metadata/name");
    let what = format!("{api} {kind} {name}");
    match (api.as_str(), kind.as_str()) {
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(doc),
        ("v1", "Service") => round_trip::<Service>(doc),
        ("v1", "ConfigMap") => round_trip::<ConfigMap>(doc),
        ("v1", "Secret") => round_trip::<Secret>(doc),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(doc),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(doc),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(doc),
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => {
            round_trip::<MutatingWebhookConfiguration>(doc)
        }
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(doc)
        }
        // Kinds of other projects' CRDs (the Prometheus Operator's, cert-manager's): no
        // k8s-openapi type; only their object metadata is checked.
        ("monitoring.coreos.com/v1", "PodMonitor" | "PrometheusRule")
        | ("cert-manager.io/v1", "Certificate") => round_trip::<
            k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        >(&doc["metadata"]),
        _ => Err("a kind this test does not know: add its k8s-openapi type".into()),
    }
    .map_err(|e| format!("{what}: {e}"))
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    diff("", doc, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not a valid object of its kind (unknown field or wrong type): {}",
            diffs.join("; ")
        ))
    }
}

/// The JSON pointers where `rendered` and `typed` differ.
fn diff(at: &str, rendered: &Value, typed: &Value, out: &mut Vec<String>) {
    match (rendered, typed) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                let here = format!("{at}/{k}");
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => diff(&here, x, y, out),
                    (Some(x), None) => out.push(format!("{here} = {x} is not a field")),
                    (None, Some(y)) => out.push(format!("{here} appeared as {y}")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff(&format!("{at}/{i}"), x, y, out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{at}: rendered {a}, typed {b}")),
    }
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// Runs `binary <args> --help`: clap parses every argument before it reaches --help, so the
/// exit status is 0 only if each flag exists and each value is accepted.
fn binary_accepts(binary: &str, args: &[String]) {
    let path = weft_e2e::bin(binary).unwrap();
    let mut cmd = Command::new(&path);
    // The flags alone, not this machine's environment fallbacks.
    for (k, _) in std::env::vars() {
        if k.starts_with("WEFT_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.args(args).arg("--help").output().unwrap();
    assert!(
        out.status.success(),
        "{binary} refuses the chart's arguments {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The default of `flag` in `binary --help`.
fn help_default(binary: &str, flag: &str) -> String {
    let out = Command::new(weft_e2e::bin(binary).unwrap())
        .env_clear()
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let at = help
        .find(&format!("{flag} <"))
        .unwrap_or_else(|| panic!("{binary} --help has no {flag}:\n{help}"));
    let rest = &help[at..];
    let start = rest.find("[default: ").unwrap() + "[default: ".len();
    rest[start..start + rest[start..].find(']').unwrap()].to_string()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// The chart's flags are the binaries' own, for every variant.
#[test]
fn chart_arguments_parse_with_the_real_binaries() {
    for (name, overrides) in variants() {
        let Some(r) = helm(overrides) else { return };
        for (kind, workload, binary) in [
            ("Deployment", "weft-controller", "weft-controller"),
            ("Deployment", "weft-injector", "weft-injector"),
            ("DaemonSet", "weft-cni-agent", "weft-cni-agent"),
        ] {
            if r.get(kind, workload).is_none() {
                assert!(binary == "weft-cni-agent", "variant {name}: no {workload}");
                continue;
            }
            let pod = r.pod(kind, workload);
            let c = container(&pod, binary);
            assert!(c.command.is_none(), "{binary}: the image's entrypoint runs");
            binary_accepts(binary, c.args.as_deref().unwrap_or_default());
        }
        eprintln!("variant {name}: arguments accepted");
    }
}

/// values.yaml's ports, images and injector settings are the binaries' defaults; Chart.yaml's
/// versions the workspace's.
#[test]
fn defaults_are_the_binaries_defaults() {
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let chart: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["version"], version, "Chart.yaml version");
    assert_eq!(chart["appVersion"], version, "Chart.yaml appVersion");

    for (binary, flag, value) in [
        (
            "weft-controller",
            "--destination-addr",
            "/controller/ports/destination",
        ),
        (
            "weft-controller",
            "--identity-addr",
            "/controller/ports/identity",
        ),
        ("weft-controller", "--admin-addr", "/controller/ports/admin"),
        ("weft-injector", "--addr", "/injector/port"),
        ("weft-cni-agent", "--metrics-addr", "/cni/metricsPort"),
    ] {
        assert_eq!(
            values.pointer(value).and_then(Value::as_u64),
            Some(port_of(&help_default(binary, flag))),
            "values.yaml {value} is not {binary}'s {flag} default"
        );
    }
    for (binary, flag, value) in [
        (
            "weft-controller",
            "--cluster-domain",
            "/controller/clusterDomain",
        ),
        ("weft-controller", "--trust-domain", "/identity/trustDomain"),
        (
            "weft-controller",
            "--default-inbound-policy",
            "/controller/defaultInboundPolicy",
        ),
        (
            "weft-controller",
            "--cluster-networks",
            "/controller/clusterNetworks",
        ),
        (
            "weft-controller",
            "--cert-lifetime",
            "/identity/certLifetime",
        ),
        ("weft-controller", "--log", "/controller/log"),
        ("weft-injector", "--log", "/injector/log"),
        ("weft-injector", "--trust-domain", "/identity/trustDomain"),
        ("weft-cni-agent", "--log", "/cni/log"),
        ("weft-cni-agent", "--log-format", "/cni/logFormat"),
        ("weft-cni-agent", "--pin-dir", "/cni/pinDir"),
    ] {
        assert_eq!(
            str_at(&values, value),
            help_default(binary, flag),
            "values.yaml {value} is not {binary}'s {flag} default"
        );
    }
    // The agent's socket and state directory live under cni.runDir.
    let run_dir = str_at(&values, "/cni/runDir");
    assert_eq!(
        help_default("weft-cni-agent", "--socket"),
        format!("{run_dir}/cni.sock")
    );
    assert_eq!(
        help_default("weft-cni-agent", "--state-dir"),
        format!("{run_dir}/agent")
    );
    assert_eq!(
        str_at(&values, "/cni/conflist/plugins/0/agentSocket"),
        format!("{run_dir}/cni.sock")
    );

    let inject = weft_injector::patch::InjectConfig::default();
    let registry = str_at(&values, "/image/registry");
    for (image, key) in [
        (&inject.proxy_image, "/injector/proxyImage"),
        (&inject.init_image, "/injector/initImage"),
    ] {
        assert_eq!(
            image,
            &format!("{registry}/{}:v{version}", str_at(&values, key)),
            "values.yaml {key} and image.registry are not the injector's default image"
        );
    }
    assert_eq!(
        str_at(&values, "/injector/nativeSidecar"),
        help_default("weft-injector", "--native-sidecar"),
        "values.yaml injector.nativeSidecar is not the injector's --native-sidecar default"
    );
    assert_eq!(values["cni"]["enabled"], inject.cni);
    assert_eq!(
        str_at(&values, "/identity/trustDomain"),
        inject.trust_domain
    );

    // The Prometheus scrape config and PodMonitors keep the controller's and the agent's
    // ports by number.
    let admin = values["controller"]["ports"]["admin"].as_u64().unwrap();
    let metrics = values["cni"]["metricsPort"].as_u64().unwrap();
    for file in ["prometheus-scrape-config.yaml", "podmonitor.yaml"] {
        let text = std::fs::read_to_string(chart_dir().join("templates").join(file)).unwrap();
        assert!(text.contains(&format!("weft-controller;{admin}")), "{file}");
        assert!(
            text.contains(&format!("weft-cni-agent;{metrics}")),
            "{file}"
        );
    }
}

fn args_of(r: &Rendered, kind: &str, workload: &str) -> Vec<String> {
    container(&r.pod(kind, workload), workload)
        .args
        .clone()
        .unwrap_or_default()
}

/// What an operator relies on: restricted containers, HA, the CNI wiring, the webhook.
#[test]
fn rendered_objects_do_what_the_values_say() {
    let Some(defaults) = helm(json!({})) else {
        return;
    };
    // Defaults: one controller, no PDB (it would block drains), no CNI, weft-init injected.
    let controller = defaults.one("Deployment", "weft-controller");
    assert_eq!(controller["spec"]["replicas"], 1);
    assert!(defaults
        .get("PodDisruptionBudget", "weft-controller")
        .is_none());
    assert!(defaults.get("DaemonSet", "weft-cni-agent").is_none());
    assert!(args_of(&defaults, "Deployment", "weft-injector").contains(&"--cni=false".into()));
    // No issuer: no identity flags anywhere.
    assert!(!args_of(&defaults, "Deployment", "weft-controller")
        .iter()
        .any(|a| a.starts_with("--issuer")));
    assert!(!args_of(&defaults, "Deployment", "weft-injector")
        .iter()
        .any(|a| a.starts_with("--identity-addr")));

    // Every container but the CNI agent's: non-root, read-only root, no capabilities, seccomp.
    for (kind, name) in [
        ("Deployment", "weft-controller"),
        ("Deployment", "weft-injector"),
    ] {
        let pod = defaults.pod(kind, name);
        let sc = container(&pod, name).security_context.clone().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true), "{name}");
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{name}");
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "{name}");
        assert_eq!(caps.add, None, "{name}");
        assert_eq!(
            sc.seccomp_profile.unwrap().type_,
            "RuntimeDefault",
            "{name}"
        );
        let c = container(&pod, name);
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
        assert!(c.resources.is_some());
    }
    let probe = container(
        &defaults.pod("Deployment", "weft-controller"),
        "weft-controller",
    )
    .readiness_probe
    .clone()
    .unwrap();
    assert_eq!(probe.http_get.unwrap().path.as_deref(), Some("/ready"));

    // The webhook: the release's namespace excluded, the generated CA is the Secret's.
    let webhook = &defaults.one("MutatingWebhookConfiguration", "weft-injector")["webhooks"][0];
    let excluded = webhook["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "kubernetes.io/metadata.name")
        .unwrap();
    assert!(excluded["values"]
        .as_array()
        .unwrap()
        .contains(&json!(NAMESPACE)));
    assert_eq!(webhook["failurePolicy"], "Ignore");
    let secret = defaults.one("Secret", "weft-injector-tls");
    assert_eq!(
        webhook["clientConfig"]["caBundle"],
        secret["data"]["ca.crt"]
    );

    // HA: 3 replicas, one per node, at least 2 through a drain.
    let Some(ha) = helm(json!({"controller": {"highAvailability": true}})) else {
        return;
    };
    assert_eq!(
        ha.one("Deployment", "weft-controller")["spec"]["replicas"],
        3
    );
    let anti = ha.pod("Deployment", "weft-controller").affinity.unwrap();
    let terms = anti
        .pod_anti_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(terms[0].topology_key, "kubernetes.io/hostname");
    assert_eq!(
        ha.one("PodDisruptionBudget", "weft-controller")["spec"]["minAvailable"],
        2
    );

    // CNI: the agent with exactly the capabilities it needs, the host paths, the installer,
    // the metrics port Prometheus keeps; the injector told not to add weft-init.
    let Some(cni) = helm(json!({"cni": {"enabled": true}})) else {
        return;
    };
    assert!(args_of(&cni, "Deployment", "weft-injector").contains(&"--cni=true".into()));
    let pod = cni.pod("DaemonSet", "weft-cni-agent");
    assert_eq!(pod.host_network, Some(true));
    let agent = container(&pod, "weft-cni-agent");
    let sc = agent.security_context.clone().unwrap();
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]));
    assert_eq!(
        caps.add,
        Some(vec!["BPF".into(), "NET_ADMIN".into(), "PERFMON".into()])
    );
    let port = &agent.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("metrics"), 9964)
    );
    let installer = container(&pod, "install-cni");
    let isc = installer.security_context.clone().unwrap();
    assert_eq!(isc.capabilities.unwrap().add, None);
    assert_eq!(isc.read_only_root_filesystem, Some(true));
    let host_paths: BTreeSet<String> = pod
        .volumes
        .unwrap()
        .into_iter()
        .filter_map(|v| v.host_path.map(|h| h.path))
        .collect();
    assert_eq!(
        host_paths,
        ["/etc/cni/net.d", "/opt/cni/bin", "/run/weft", "/sys/fs/bpf"]
            .map(String::from)
            .into()
    );
    // The conflist the installer writes parses as weft-cni's own configuration.
    let conflist = &cni.one("ConfigMap", "weft-cni-config")["data"]["05-weft.conflist"];
    let conflist: Value = serde_json::from_str(conflist.as_str().unwrap()).unwrap();
    let mut plugin = conflist["plugins"][0].clone();
    // A runtime hands each plugin its entry plus the list's cniVersion and name.
    plugin["cniVersion"] = conflist["cniVersion"].clone();
    plugin["name"] = conflist["name"].clone();
    let conf = weft_cni::config::NetConf::parse(plugin.to_string().as_bytes())
        .unwrap_or_else(|e| panic!("the chart's conflist: {e}"));
    assert_eq!(conf.plugin_type, "weft-cni");
    assert_eq!(conf.agent_socket, PathBuf::from("/run/weft/cni.sock"));
    // Each node's pods get addresses from its own Node's pod CIDR: the default ranges ask
    // weft-cni to fill them in (a static subnet would hand every node the same addresses).
    let holes = weft_cni::pod_cidr::placeholders(&plugin["ipam"]);
    assert_eq!(
        holes.len(),
        1,
        "the default conflist's host-local ranges use usePodCidr: {}",
        plugin["ipam"]
    );
}

/// charts/weft/README.md's table lists every key of values.yaml.
#[test]
fn readme_lists_every_value() {
    fn leaves(v: &Value, at: &str, out: &mut Vec<String>) {
        match v {
            // Free-form objects are one row each.
            Value::Object(m)
                if !m.is_empty() && !at.ends_with(".conflist") && !at.ends_with(".resources") =>
            {
                for (k, v) in m {
                    let here = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    leaves(v, &here, out);
                }
            }
            _ => out.push(at.to_string()),
        }
    }
    let values: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(chart_dir().join("README.md")).unwrap();
    let mut keys = Vec::new();
    leaves(&values, "", &mut keys);
    let missing: Vec<_> = keys
        .iter()
        .filter(|k| !readme.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "charts/weft/README.md's values table lacks {missing:?}"
    );
}

/// crds/ holds exactly the CRDs the Rust types generate, one file per CRD named after it
/// (control-plane/tests/crds.rs regenerates them).
#[test]
fn crds_are_exactly_the_generated_ones() {
    let generated = weft_model::crd_files().unwrap();
    let mut want = BTreeSet::new();
    for (file, yaml) in &generated {
        let crd: Value = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(*file, format!("{}.yaml", str_at(&crd, "/metadata/name")));
        want.insert(file.clone());
    }
    let have: BTreeSet<String> = std::fs::read_dir(chart_dir().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        have, want,
        "charts/weft/crds/ holds other files than the generated CRDs"
    );
    for (file, yaml) in &generated {
        let committed = std::fs::read_to_string(chart_dir().join("crds").join(file)).unwrap();
        assert!(
            committed == *yaml,
            "charts/weft/crds/{file} differs from the generator: \
             WEFT_UPDATE_CRDS=1 cargo test -p weft-controller --test crds"
        );
    }
}
