//! `weft check` against the project's fake API server: a healthy installation passes every
//! check, and each way of breaking it fails (or warns) with its own message and hint; the
//! pre-install checks; an unreachable API server; and `-o json`.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::CustomResourceExt as _;
use serde_json::{json, Value};
use weft_controller::identity::devca::CaCert;
use weft_controller::testing::fake_apiserver::{FakeApiServer, Resource};

const NS: &str = "weft";
const VERSION: &str = "0.1.0";
const DAY: Duration = Duration::from_secs(86_400);

fn weft(args: &[&str], kubeconfig: &str) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft"));
    cmd.arg("check").args(args);
    cmd.env("KUBECONFIG", kubeconfig)
        .env("HOME", "/nonexistent")
        .env_remove("KUBERNETES_SERVICE_HOST");
    cmd.output().unwrap()
}

fn pod(ns: &str, name: &str, labels: Value, annotations: Value, ready: bool, node: &str) -> Value {
    json!({
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels, "annotations": annotations},
        "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}
        ]},
    })
}

fn secret(ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
    let s = Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        type_: Some("kubernetes.io/tls".into()),
        ..Default::default()
    };
    let mut v = serde_json::to_value(s).unwrap();
    v["kind"] = json!("Secret");
    v
}

/// A serving certificate for `dns`, signed by `ca`.
fn serving_cert(ca: &CaCert, dns: &str, now: SystemTime) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec![dns.to_string()]).unwrap();
    params.not_before = (now - DAY).into();
    params.not_after = (now + 90 * DAY).into();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, &ca.key).unwrap();
    params.signed_by(&key, &issuer).unwrap().pem()
}

struct World {
    webhook_ca: CaCert,
    root: CaCert,
    issuer: CaCert,
}

impl World {
    fn new() -> World {
        let now = SystemTime::now();
        let root = CaCert::root("root.weft.test", now - DAY, 3650 * DAY).unwrap();
        let issuer = root
            .issue_ca("identity.weft.cluster.local", now - DAY, 365 * DAY)
            .unwrap();
        let webhook_ca = CaCert::root("weft-injector-ca", now - DAY, 365 * DAY).unwrap();
        World {
            webhook_ca,
            root,
            issuer,
        }
    }

    /// Everything a healthy installation has.
    fn install(&self, fake: &FakeApiServer) {
        let now = SystemTime::now();
        for crd in [
            weft_model::policy::BackendPolicy::crd(),
            weft_model::authz::Server::crd(),
            weft_model::authz::AuthorizationPolicy::crd(),
        ] {
            let mut crd = serde_json::to_value(crd).unwrap();
            crd["kind"] = json!("CustomResourceDefinition");
            fake.apply(crd);
        }
        for (plural, kind) in [("httproutes", "HTTPRoute"), ("grpcroutes", "GRPCRoute")] {
            fake.apply(json!({
                "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{plural}.gateway.networking.k8s.io")},
                "spec": {"group": "gateway.networking.k8s.io", "scope": "Namespaced",
                         "names": {"plural": plural, "kind": kind},
                         "versions": [{"name": "v1", "served": true, "storage": true}]},
            }));
        }
        fake.apply(json!({"kind": "Namespace", "metadata": {"name": NS}}));
        let cp = |name: &str| json!({"app.kubernetes.io/name": name, "app.kubernetes.io/version": VERSION});
        fake.apply(pod(
            NS,
            "weft-controller-5d9c7-abcde",
            cp("weft-controller"),
            json!({}),
            true,
            "node-1",
        ));
        fake.apply(pod(
            NS,
            "weft-injector-7f8b9-fghij",
            cp("weft-injector"),
            json!({}),
            true,
            "node-1",
        ));
        fake.apply(
            json!({"kind": "Service", "metadata": {"namespace": NS, "name": "weft-injector"},
                          "spec": {"ports": [{"port": 443}]}}),
        );
        fake.apply(json!({
            "kind": "EndpointSlice",
            "metadata": {"namespace": NS, "name": "weft-injector-x1",
                         "labels": {"kubernetes.io/service-name": "weft-injector"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.9"], "conditions": {"ready": true}}],
        }));
        webhook(fake, &self.webhook_ca.cert_pem);
        let serving = serving_cert(&self.webhook_ca, "weft-injector.weft.svc", now);
        fake.apply(secret(
            NS,
            "weft-injector-tls",
            &[("tls.crt", &serving), ("ca.crt", &self.webhook_ca.cert_pem)],
        ));
        fake.apply(secret(
            NS,
            "weft-identity-issuer",
            &[
                ("tls.crt", &self.issuer.cert_pem),
                ("tls.key", &self.issuer.key_pem()),
                ("ca.crt", &self.root.cert_pem),
            ],
        ));
        // The controller's namespace and every meshed one.
        for ns in [NS, "shop"] {
            fake.apply(json!({"kind": "ConfigMap",
                              "metadata": {"namespace": ns, "name": "weft-trust-anchors"},
                              "data": {"ca.crt": self.root.cert_pem}}));
        }
        let meshed = json!({"weft.dev/proxy-version": VERSION});
        fake.apply(pod(
            "shop",
            "web-1",
            json!({"app": "web"}),
            meshed.clone(),
            true,
            "node-1",
        ));
        fake.apply(pod(
            "shop",
            "web-2",
            json!({"app": "web"}),
            meshed,
            true,
            "node-2",
        ));
        fake.apply(
            json!({"kind": "DaemonSet", "metadata": {"namespace": NS, "name": "weft-cni-agent"},
                          "spec": {"selector": {}, "template": {}}}),
        );
        for node in ["node-1", "node-2"] {
            fake.apply(json!({"kind": "Node", "metadata": {"name": node}}));
            fake.apply(pod(
                NS,
                &format!("weft-cni-agent-{node}"),
                json!({"app.kubernetes.io/name": "weft-cni-agent"}),
                json!({}),
                true,
                node,
            ));
        }
    }
}

/// The injector's MutatingWebhookConfiguration with `ca_pem` as its caBundle.
fn webhook(fake: &FakeApiServer, ca_pem: &str) {
    {
        let mut v = serde_json::to_value(
            k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration {
                metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                    name: Some("weft-injector".into()),
                    ..Default::default()
                },
                webhooks: Some(vec![
                    k8s_openapi::api::admissionregistration::v1::MutatingWebhook {
                        name: "inject.weft.dev".into(),
                        admission_review_versions: vec!["v1".into()],
                        side_effects: "None".into(),
                        client_config:
                            k8s_openapi::api::admissionregistration::v1::WebhookClientConfig {
                                ca_bundle: Some(ByteString(ca_pem.as_bytes().to_vec())),
                                service: Some(
                                    k8s_openapi::api::admissionregistration::v1::ServiceReference {
                                        name: "weft-injector".into(),
                                        namespace: NS.into(),
                                        ..Default::default()
                                    },
                                ),
                                ..Default::default()
                            },
                        ..Default::default()
                    },
                ]),
            },
        )
        .unwrap();
        v["kind"] = json!("MutatingWebhookConfiguration");
        fake.apply(v);
    }
}

/// Runs `weft check -o json` and returns (exit code, the checks by description).
fn check_json(config: &str, extra: &[&str]) -> (i32, Vec<Value>) {
    let mut args = vec!["-o", "json"];
    args.extend_from_slice(extra);
    let out = weft(&args, config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(
        doc["success"],
        json!(out.status.code() == Some(0)),
        "success agrees with the exit status"
    );
    (
        out.status.code().unwrap_or(-1),
        doc["checks"].as_array().unwrap().clone(),
    )
}

fn find<'a>(checks: &'a [Value], description: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["description"].as_str().unwrap().starts_with(description))
        .unwrap_or_else(|| panic!("no check {description:?} in {checks:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_installation_passes_and_each_fault_is_named() {
    let fake = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = support::kubeconfig(dir.path(), &format!("http://{}", fake.addr()));
    let world = World::new();
    world.install(&fake);
    let run = |extra: Vec<&'static str>| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || check_json(&config, &extra))
    };

    let (code, checks) = run(vec![]).await.unwrap();
    let bad: Vec<&Value> = checks.iter().filter(|c| c["result"] != "ok").collect();
    assert!(bad.is_empty(), "{bad:#?}");
    assert_eq!(code, 0);
    assert!(checks.len() >= 14, "{checks:#?}");

    // The table: one line per check, ✔, and the verdict.
    let out = tokio::task::spawn_blocking({
        let config = config.clone();
        move || weft(&[], &config)
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if std::env::var_os("WEFT_PRINT_CHECK").is_some() {
        eprintln!("{text}");
    }
    assert!(text.contains("✔ can reach the API server"), "{text}");
    assert!(
        text.contains("✔ the CNI agent runs on every node (2 node(s))"),
        "{text}"
    );
    assert!(text.ends_with("Status check results are ✔\n"), "{text}");

    // Each fault, one at a time: (break, check, result, message part, restore).
    type Step = Box<dyn Fn(&FakeApiServer)>;
    let now = SystemTime::now();
    let other_ca_pem = CaCert::root("someone-else", now - DAY, 365 * DAY)
        .unwrap()
        .cert_pem;
    let other_root = CaCert::root("other-root", now - DAY, 365 * DAY).unwrap();
    let expiring = world
        .root
        .issue_ca("identity.weft.cluster.local", now - DAY, 11 * DAY)
        .unwrap();
    let expiring_pem = (expiring.cert_pem.clone(), expiring.key_pem());
    let root_pem = world.root.cert_pem.clone();
    let other_root_pem = other_root.cert_pem.clone();
    let wrong_name = serving_cert(&world.webhook_ca, "injector.elsewhere.svc", now);
    let cases: Vec<(&str, Step, &str, &str, &str)> = vec![
        (
            "CRD missing",
            Box::new(|f| {
                f.delete(Resource::CustomResourceDefinitions, "", "backendpolicies.policy.weft.dev");
            }),
            "CRD backendpolicies.policy.weft.dev is installed and current",
            "error",
            "CRD backendpolicies.policy.weft.dev not found",
        ),
        (
            "Server CRD missing",
            Box::new(|f| {
                f.delete(
                    Resource::CustomResourceDefinitions,
                    "",
                    "servers.policy.weft.dev",
                );
            }),
            "CRD servers.policy.weft.dev is installed and current",
            "error",
            "CRD servers.policy.weft.dev not found",
        ),
        (
            "CRD stale",
            Box::new(|f| {
                let mut crd = serde_json::to_value(weft_model::policy::BackendPolicy::crd()).unwrap();
                crd["kind"] = json!("CustomResourceDefinition");
                crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"] = json!({});
                f.apply(crd);
            }),
            "CRD backendpolicies.policy.weft.dev is installed and current",
            "error",
            "the schema of version v1alpha1 differs",
        ),
        (
            "Gateway API missing",
            Box::new(|f| {
                f.delete(Resource::CustomResourceDefinitions, "", "grpcroutes.gateway.networking.k8s.io");
            }),
            "the Gateway API CRDs",
            "warning",
            "not found: grpcroutes.gateway.networking.k8s.io",
        ),
        (
            "controller not ready",
            Box::new(|f| {
                f.apply(pod(NS, "weft-controller-5d9c7-abcde",
                    json!({"app.kubernetes.io/name": "weft-controller", "app.kubernetes.io/version": VERSION}),
                    json!({}), false, "node-1"));
            }),
            "weft-controller pods are ready",
            "error",
            "not ready: weft-controller-5d9c7-abcde",
        ),
        (
            "controller in plaintext",
            Box::new(|f| {
                let mut p = pod(NS, "weft-controller-5d9c7-abcde",
                    json!({"app.kubernetes.io/name": "weft-controller", "app.kubernetes.io/version": VERSION}),
                    json!({}), true, "node-1");
                p["spec"]["containers"] = json!([{"name": "controller",
                    "args": ["--source", "kube", "--insecure-plaintext"]}]);
                f.apply(p);
            }),
            "the control plane requires TLS",
            "warning",
            "weft-controller-5d9c7-abcde run(s) with --insecure-plaintext",
        ),
        (
            "injector gone",
            Box::new(|f| {
                f.delete(Resource::Pods, NS, "weft-injector-7f8b9-fghij");
            }),
            "weft-injector pods are ready",
            "error",
            "no pod labelled app.kubernetes.io/name=weft-injector in weft",
        ),
        (
            "no endpoints",
            Box::new(|f| {
                f.delete(Resource::EndpointSlices, NS, "weft-injector-x1");
            }),
            "the webhook calls the injector Service",
            "error",
            "has no ready endpoint",
        ),
        (
            "webhook missing",
            Box::new(|f| {
                f.delete(Resource::MutatingWebhookConfigurations, "", "weft-injector");
            }),
            "MutatingWebhookConfiguration weft-injector exists",
            "error",
            "not found: pods are not injected",
        ),
        (
            "caBundle of another CA",
            {
                let pem = other_ca_pem.clone();
                Box::new(move |f| webhook(f, &pem))
            },
            "the webhook's CA bundle signed",
            "error",
            "is not signed by the caBundle's CA",
        ),
        (
            "serving certificate for another name",
            {
                let crt = wrong_name.clone();
                let ca = world.webhook_ca.cert_pem.clone();
                Box::new(move |f| f.apply(secret(NS, "weft-injector-tls", &[("tls.crt", &crt), ("ca.crt", &ca)])))
            },
            "the webhook's CA bundle signed",
            "error",
            "not weft-injector.weft.svc",
        ),
        (
            "issuer missing",
            Box::new(|f| {
                f.delete(Resource::Secrets, NS, "weft-identity-issuer");
            }),
            "the issuer certificate is valid",
            "error",
            "Secret weft/weft-identity-issuer not found",
        ),
        (
            "issuer not signed by the anchors",
            {
                let (crt, key) = (world.issuer.cert_pem.clone(), world.issuer.key_pem());
                let anchors = other_root_pem.clone();
                Box::new(move |f| f.apply(secret(NS, "weft-identity-issuer", &[("tls.crt", &crt), ("tls.key", &key), ("ca.crt", &anchors)])))
            },
            "the issuer certificate is valid",
            "error",
            "Secret weft/weft-identity-issuer tls.crt",
        ),
        (
            "issuer expiring",
            {
                let (crt, key) = expiring_pem.clone();
                let anchors = root_pem.clone();
                Box::new(move |f| f.apply(secret(NS, "weft-identity-issuer", &[("tls.crt", &crt), ("tls.key", &key), ("ca.crt", &anchors)])))
            },
            "the issuer certificate is not about to expire",
            "warning",
            "(in 9 days)",
        ),
        (
            "anchors differ",
            {
                let anchors = other_root_pem.clone();
                Box::new(move |f| f.apply(json!({"kind": "ConfigMap", "metadata": {"namespace": NS, "name": "weft-trust-anchors"}, "data": {"ca.crt": anchors}})))
            },
            "proxies are given the controller's trust anchors",
            "error",
            "are not in ConfigMap weft/weft-trust-anchors",
        ),
        (
            "a meshed namespace without anchors",
            Box::new(|f| {
                f.delete(Resource::ConfigMaps, "shop", "weft-trust-anchors");
            }),
            "proxies are given the controller's trust anchors",
            "error",
            "ConfigMap shop/weft-trust-anchors with ca.crt not found",
        ),
        (
            "old proxy",
            Box::new(|f| {
                f.apply(pod("shop", "web-2", json!({"app": "web"}), json!({"weft.dev/proxy-version": "0.0.9"}), true, "node-2"));
            }),
            "meshed pods run the control plane's proxy version",
            "warning",
            "1 of 2 meshed pods run another proxy version than the control plane's 0.1.0: shop/web-2 (0.0.9)",
        ),
        (
            "node without agent",
            Box::new(|f| {
                f.apply(json!({"kind": "Node", "metadata": {"name": "node-3"}}));
            }),
            "the CNI agent runs on every node",
            "error",
            "no ready agent on: node-3",
        ),
        (
            "old Kubernetes",
            Box::new(|f| f.set_version(Some((1, 27)))),
            "the API server's version is supported",
            "error",
            "the API server is v1.27.0; Weft needs Kubernetes 1.29 or newer",
        ),
    ];
    let fake = std::sync::Arc::new(fake);
    // The chart's layout: the issuer Secret holds no ca.crt, the anchors are the ConfigMap's.
    {
        let (crt, key) = (world.issuer.cert_pem.clone(), world.issuer.key_pem());
        fake.apply(secret(
            NS,
            "weft-identity-issuer",
            &[("tls.crt", &crt), ("tls.key", &key)],
        ));
        let (code, checks) = run(vec![]).await.unwrap();
        let bad: Vec<&Value> = checks.iter().filter(|c| c["result"] != "ok").collect();
        assert!(bad.is_empty(), "chart layout: {bad:#?}");
        assert_eq!(code, 0);
    }
    for (what, step, description, result, message) in cases {
        // A fresh healthy world, then the one fault.
        fake.set_version(Some((1, 31)));
        world.install(&fake);
        fake.delete(Resource::Nodes, "", "node-3");
        step(&fake);
        let (code, checks) = run(vec![]).await.unwrap();
        let c = find(&checks, description);
        assert_eq!(c["result"], result, "{what}: {c:#}");
        assert!(
            c["message"].as_str().unwrap_or_default().contains(message),
            "{what}: want {message:?} in {c:#}"
        );
        assert!(
            c["hint"].as_str().is_some_and(|h| !h.is_empty()),
            "{what}: {c:#}"
        );
        assert_eq!(code, if result == "error" { 1 } else { 0 }, "{what}");
        let others: Vec<&Value> = checks
            .iter()
            .filter(|o| o["result"] != "ok" && o["description"] != c["description"])
            // The issuer's anchors are also the ones compared with the proxies'.
            .filter(|_| what != "issuer not signed by the anchors")
            .collect();
        assert!(
            others.is_empty(),
            "{what}: other checks failed too: {others:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_install_checks_the_cluster_and_refuses_a_second_install() {
    let fake = FakeApiServer::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = support::kubeconfig(dir.path(), &format!("http://{}", fake.addr()));
    let run = |config: String| tokio::task::spawn_blocking(move || check_json(&config, &["--pre"]));

    // An empty cluster: fine, with a warning for the missing Gateway API.
    let (code, checks) = run(config.clone()).await.unwrap();
    assert_eq!(code, 0, "{checks:#?}");
    assert_eq!(
        find(&checks, "the control plane namespace weft is free")["result"],
        "ok"
    );
    assert_eq!(
        find(
            &checks,
            "CRD backendpolicies.policy.weft.dev can be installed"
        )["result"],
        "ok"
    );
    assert_eq!(find(&checks, "the Gateway API CRDs")["result"], "warning");

    // Weft already installed there.
    World::new().install(&fake);
    let (code, checks) = run(config).await.unwrap();
    assert_eq!(code, 1);
    let c = find(&checks, "the control plane namespace weft is free");
    assert_eq!(c["result"], "error");
    assert_eq!(
        c["message"],
        "Weft already runs in weft: weft-controller-5d9c7-abcde"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_is_one_failed_check() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = support::kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"));
    let (code, checks) =
        tokio::task::spawn_blocking(move || check_json(&config, &["--timeout", "2"]))
            .await
            .unwrap();
    assert_eq!(code, 1);
    assert_eq!(checks.len(), 1, "{checks:#?}");
    assert_eq!(checks[0]["description"], "can reach the API server");
    assert!(checks[0]["message"]
        .as_str()
        .unwrap()
        .contains(&format!("127.0.0.1:{port}")));

    // No kubeconfig at all: exit 2 with the reason.
    let out = weft(&[], "/nonexistent/kubeconfig");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("weft check: no usable kubeconfig"));
}

/// The names `weft check` looks for are the ones the chart installs.
#[test]
fn the_names_checked_are_the_charts() {
    use weft_cli::check::names;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/templates");
    let text: String = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    for name in [
        names::CONTROLLER,
        names::INJECTOR,
        names::WEBHOOK,
        names::INJECTOR_TLS_SECRET,
        names::ISSUER_SECRET,
        names::TRUST_ANCHORS_CONFIGMAP,
        names::CNI_AGENT,
    ] {
        assert!(
            text.contains(&format!("name: {name}\n"))
                || text.contains(&format!("\n{name}\n"))
                || text.contains(&format!("default \"{name}\"")),
            "charts/weft/templates names no {name}"
        );
    }
    for label in [names::NAME_LABEL, names::VERSION_LABEL] {
        assert!(
            text.contains(&format!("{label}:")),
            "the chart sets no {label}"
        );
    }
}
