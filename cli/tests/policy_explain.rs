//! `weft policy explain` end to end: the real `weft` binary against manifest
//! directories the tests write (and once against the fake Kubernetes API
//! server through a kubeconfig), checking the text a user reads, the JSON a
//! script reads and the exit status (0 allowed, 1 denied, 2 error).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

/// Namespaces `shop` (team=shop), `ops` (team=ops) and `other`; pods
/// `shop/web` (meshed, port `http` 8080), `shop/client`, `shop/db` (port
/// 5432), `ops/monitor` and `other/free`; in `shop`: a default deny for
/// ingress, web allowed from client pods (by podSelector) on 8080 and from
/// the ops namespace (by namespaceSelector) on the named port `http`, db
/// allowed from a LAN ipBlock with an except, and client's egress isolated
/// to web on 8080.
const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: ops}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec:
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}]
  - name: weft-proxy
status: {phase: Running, podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, labels: {app: client}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {containers: [{name: db, ports: [{name: pg, containerPort: 5432}]}]}
status: {phase: Running, podIP: 10.1.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: monitor, namespace: ops, labels: {app: monitor}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.1.2}
---
apiVersion: v1
kind: Pod
metadata: {name: free, namespace: other, labels: {app: free}}
spec: {containers: [{name: app, ports: [{name: dns, containerPort: 53, protocol: UDP}]}]}
status: {phase: Running, podIP: 10.1.2.2}
"#;

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-client, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-ops, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: ops}}}]
    ports: [{port: http, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-lan, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]
    ports: [{port: 5432}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8080}]
"#;

/// A directory holding the world in two files (one in a subdirectory).
fn world_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("world.yaml"), WORLD).unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/netpol.yaml"), POLICIES).unwrap();
    dir
}

fn weft(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft"));
    cmd.arg("policy").arg("explain").args(args);
    // Never read the developer's cluster.
    cmd.env_remove("KUBECONFIG").env("HOME", "/nonexistent");
    cmd.env_remove("KUBERNETES_SERVICE_HOST");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Runs against `dir`; returns (exit code, stdout, stderr).
fn explain(dir: &Path, from: &str, to: &str, port: &str, json: bool) -> (i32, String, String) {
    let mut args = vec![
        "--manifests",
        dir.to_str().unwrap(),
        "--from",
        from,
        "--to",
        to,
        "--port",
        port,
    ];
    if json {
        args.extend(["-o", "json"]);
    }
    let out = weft(&args, &[]);
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// The text report and the JSON document of one connection, with the exit
/// status each run returned (the same for both).
fn both(dir: &Path, from: &str, to: &str, port: &str) -> (i32, String, Value) {
    let (code, text, err) = explain(dir, from, to, port, false);
    assert!(err.is_empty(), "stderr: {err}");
    let (jcode, json, err) = explain(dir, from, to, port, true);
    assert!(err.is_empty(), "stderr: {err}");
    assert_eq!(code, jcode);
    (code, text, serde_json::from_str(&json).unwrap())
}

fn direction(
    decision: &str,
    policy: Option<&str>,
    rule: Option<u64>,
    isolated_by: &[&str],
) -> Value {
    json!({"decision": decision, "policy": policy, "rule": rule,
           "isolated_by": isolated_by, "proxy_inbound_port_for": null})
}

#[test]
fn allowed_by_pod_selector_with_egress_isolation() {
    let dir = world_dir();
    let (code, text, json) = both(dir.path(), "shop/client", "shop/web", "8080");
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "allowed: shop/client (10.1.0.3) -> shop/web (10.1.0.2), port 8080/TCP\n\
         \x20 egress: allowed by shop/client-egress spec.egress[0] (shop/client is isolated by shop/client-egress)\n\
         \x20 ingress: allowed by shop/allow-client spec.ingress[0] (shop/web is isolated by shop/allow-client, shop/allow-ops, shop/default-deny)\n\
         \x20 mesh: allowed by default:all-unauthenticated (server default:all-unauthenticated)\n\
         \x20   client: unauthenticated 10.1.0.3 (shop/client has no Weft proxy)\n"
    );
    assert_eq!(json["verdict"], "allowed");
    assert_eq!(json["allowed"], true);
    assert_eq!(
        json["from"],
        json!({"pod": "shop/client", "ip": "10.1.0.3"})
    );
    assert_eq!(json["to"], json!({"pod": "shop/web", "ip": "10.1.0.2"}));
    assert_eq!(json["port"], 8080);
    assert_eq!(json["protocol"], "TCP");
    assert_eq!(json["named_port"], Value::Null);
    assert_eq!(
        json["egress"],
        direction(
            "allowed",
            Some("shop/client-egress"),
            Some(0),
            &["shop/client-egress"]
        )
    );
    assert_eq!(
        json["ingress"],
        direction(
            "allowed",
            Some("shop/allow-client"),
            Some(0),
            &["shop/allow-client", "shop/allow-ops", "shop/default-deny"]
        )
    );
}

#[test]
fn denied_by_egress_isolation_and_by_ingress_default_deny() {
    let dir = world_dir();
    // client's egress allows only web on 8080; free is not isolated.
    let (code, text, json) = both(dir.path(), "shop/client", "other/free", "53/UDP");
    assert_eq!(code, 1, "{text}");
    assert_eq!(
        text,
        "denied: shop/client (10.1.0.3) -> other/free (10.1.2.2), port 53/UDP\n\
         \x20 egress: denied: shop/client is isolated by shop/client-egress and no egress rule of it allows other/free (10.1.2.2) on port 53/UDP\n\
         \x20 ingress: allowed: no NetworkPolicy isolates other/free for ingress\n\
         \x20 mesh: not applicable: other/free has no Weft proxy, so no mesh policy applies\n"
    );
    assert_eq!(json["verdict"], "denied");
    assert_eq!(
        json["egress"],
        direction("denied", None, None, &["shop/client-egress"])
    );
    assert_eq!(json["ingress"], direction("not_isolated", None, None, &[]));

    // free is in neither the client pods nor the ops namespace.
    let (code, text, json) = both(dir.path(), "other/free", "shop/web", "8080/TCP");
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("  ingress: denied: shop/web is isolated by shop/allow-client, shop/allow-ops, shop/default-deny and no ingress rule of them allows other/free (10.1.2.2) on port 8080/TCP\n"),
        "{text}"
    );
    assert_eq!(
        json["ingress"]["isolated_by"],
        json!(["shop/allow-client", "shop/allow-ops", "shop/default-deny"])
    );
    assert_eq!(json["egress"]["decision"], "not_isolated");
    // web's default policy allows everyone: no AuthorizationPolicy says free may connect, so
    // NetworkPolicy's denial is no disagreement.
    assert_eq!(json["mesh"]["decision"], "allow");
    assert_eq!(json["mesh"]["authorization"], "default:all-unauthenticated");
    assert_eq!(json["warnings"], json!([]));
}

#[test]
fn allowed_by_namespace_selector_on_a_named_port() {
    let dir = world_dir();
    let (code, text, json) = both(dir.path(), "ops/monitor", "shop/web", "http/TCP");
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "allowed: ops/monitor (10.1.1.2) -> shop/web (10.1.0.2), port 8080/TCP (port http of shop/web)\n\
         \x20 egress: allowed: no NetworkPolicy isolates ops/monitor for egress\n\
         \x20 ingress: allowed by shop/allow-ops spec.ingress[0] (shop/web is isolated by shop/allow-client, shop/allow-ops, shop/default-deny)\n\
         \x20 mesh: allowed by default:all-unauthenticated (server default:all-unauthenticated)\n\
         \x20   client: unauthenticated 10.1.1.2 (ops/monitor has no Weft proxy)\n"
    );
    assert_eq!(json["port"], 8080);
    assert_eq!(json["named_port"], "http");
    assert_eq!(json["ingress"]["policy"], "shop/allow-ops");
    // The same port by number decides the same way.
    let (code, _, by_number) = both(dir.path(), "ops/monitor", "shop/web", "8080");
    assert_eq!(code, 0);
    assert_eq!(by_number["ingress"], json["ingress"]);
}

#[test]
fn meshed_pod_proxy_inbound_port_is_allowed_with_its_app_port() {
    let dir = world_dir();
    let (code, text, json) = both(dir.path(), "ops/monitor", "shop/web", "4143");
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("  ingress: allowed by shop/allow-ops spec.ingress[0]")
            && text.contains("    note: 4143/TCP is the Weft proxy's inbound port on meshed pod shop/web; it is allowed wherever a rule allows one of the pod's app ports (here 8080)\n"),
        "{text}"
    );
    assert_eq!(json["ingress"]["proxy_inbound_port_for"], 8080);
}

#[test]
fn ip_block_with_except_from_an_ip_source() {
    let dir = world_dir();
    let (code, text, json) = both(dir.path(), "192.168.2.7", "shop/db", "5432");
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "allowed: 192.168.2.7 -> shop/db (10.1.0.4), port 5432/TCP\n\
         \x20 egress: allowed: 192.168.2.7 is not a pod in the cluster, so no egress policy applies\n\
         \x20 ingress: allowed by shop/allow-lan spec.ingress[0] (shop/db is isolated by shop/allow-lan, shop/default-deny)\n\
         \x20 mesh: not applicable: shop/db has no Weft proxy, so no mesh policy applies\n"
    );
    assert_eq!(json["from"], json!({"pod": null, "ip": "192.168.2.7"}));
    assert_eq!(json["egress"], direction("not_a_pod", None, None, &[]));

    let (code, text, json) = both(dir.path(), "192.168.1.7", "shop/db", "5432");
    assert_eq!(code, 1, "{text}");
    assert!(
        text.starts_with("denied: 192.168.1.7 -> shop/db (10.1.0.4), port 5432/TCP\n"),
        "{text}"
    );
    assert_eq!(
        json["ingress"],
        direction(
            "denied",
            None,
            None,
            &["shop/allow-lan", "shop/default-deny"]
        )
    );
    // A pod's IP as the destination is that pod.
    let (code, _, json) = both(dir.path(), "192.168.2.7", "10.1.0.4", "5432");
    assert_eq!(code, 0);
    assert_eq!(json["to"], json!({"pod": "shop/db", "ip": "10.1.0.4"}));
}

#[test]
fn not_isolated_at_either_end() {
    let dir = world_dir();
    let (code, text, json) = both(dir.path(), "ops/monitor", "other/free", "dns/UDP");
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "allowed: ops/monitor (10.1.1.2) -> other/free (10.1.2.2), port 53/UDP (port dns of other/free)\n\
         \x20 egress: allowed: no NetworkPolicy isolates ops/monitor for egress\n\
         \x20 ingress: allowed: no NetworkPolicy isolates other/free for ingress\n\
         \x20 mesh: not applicable: other/free has no Weft proxy, so no mesh policy applies\n"
    );
    assert_eq!(json["egress"], direction("not_isolated", None, None, &[]));
    assert_eq!(json["ingress"], direction("not_isolated", None, None, &[]));
    assert_eq!(json["protocol"], "UDP");
    assert!(json["summary"].as_str().unwrap().starts_with("allowed: "));
}

#[test]
fn a_bad_manifest_fails_with_path_and_line() {
    let dir = world_dir();
    let bad = dir.path().join("policies/bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: lan, namespace: shop}\nspec:\n  podSelector: {}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/16]}}]\n",
    )
    .unwrap();
    let (code, out, err) = explain(dir.path(), "shop/client", "shop/web", "8080", false);
    assert_eq!(code, 2, "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let want = format!("weft policy explain: {}:1: document 1: ", bad.display());
    assert!(
        err.starts_with(&want) && err.contains("shop/lan") && err.contains("10.1.0.0/16"),
        "{err}"
    );

    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: [unclosed\n",
    )
    .unwrap();
    let (code, _, err) = explain(dir.path(), "shop/client", "shop/web", "8080", false);
    assert_eq!(code, 2);
    assert!(
        err.starts_with(&format!("weft policy explain: {}:", bad.display())),
        "{err}"
    );

    let (code, _, err) = explain(&dir.path().join("missing"), "a/b", "c/d", "80", false);
    assert_eq!(code, 2);
    assert!(
        err.contains("missing") && err.contains("manifest directory"),
        "{err}"
    );
}

#[test]
fn unknown_pods_and_bad_ports_are_errors() {
    let dir = world_dir();
    let (code, _, err) = explain(dir.path(), "shop/client", "shop/wbe", "8080", false);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "weft policy explain: no pod shop/wbe in the cluster state; did you mean shop/web?\n"
    );
    let (code, _, err) = explain(dir.path(), "default/monitor", "shop/web", "8080", false);
    assert_eq!(code, 2);
    assert!(
        err.contains("no pod default/monitor") && err.contains("ops/monitor"),
        "{err}"
    );
    let (code, _, err) = explain(dir.path(), "shop/client", "shop/nothing-like", "80", false);
    assert_eq!(code, 2);
    assert!(
        err.contains("(is it running, and in the namespace you meant?)"),
        "{err}"
    );

    // Named ports: the destination must be a pod that declares it.
    let (code, _, err) = explain(dir.path(), "shop/client", "shop/web", "metrics/TCP", false);
    assert_eq!(code, 2);
    assert_eq!(err, "weft policy explain: pod shop/web has no container port named metrics with protocol TCP (its named ports: http=8080/TCP)\n");
    let (code, _, err) = explain(dir.path(), "shop/client", "shop/web", "http/UDP", false);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = explain(dir.path(), "shop/client", "192.168.9.9", "http", false);
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "named port http/TCP needs a pod as the destination, and 192.168.9.9 is not one"
        ),
        "{err}"
    );

    for bad in ["80/ICMP", "0", "70000", "HTTP"] {
        let (code, _, err) = explain(dir.path(), "shop/client", "shop/web", bad, false);
        assert_eq!(code, 2, "{bad}");
        assert!(
            err.contains(&format!("{bad:?} is not a port")) && err.contains("--port"),
            "{err}"
        );
    }
    let (code, _, err) = explain(dir.path(), "client", "shop/web", "80", false);
    assert_eq!(code, 2);
    assert!(
        err.contains("\"client\" is neither namespace/pod nor an IP address"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_cluster_through_a_kubeconfig() {
    use weft_controller::testing::fake_apiserver::FakeApiServer;

    let fake = FakeApiServer::start().await.unwrap();
    for doc in WORLD.split("\n---\n").chain(POLICIES.split("\n---\n")) {
        let value: Value = serde_yaml_to_json(doc);
        fake.apply(value);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = support::kubeconfig(dir.path(), &format!("http://{}", fake.addr()));
    let run = |args: Vec<&'static str>, config: String| {
        tokio::task::spawn_blocking(move || weft(&args, &[("KUBECONFIG", config.as_str())]))
    };
    let out = run(
        vec![
            "--from",
            "ops/monitor",
            "--to",
            "shop/web",
            "--port",
            "http",
            "-o",
            "json",
        ],
        config.clone(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ingress"]["policy"], "shop/allow-ops");
    assert_eq!(json["port"], 8080);

    let out = run(
        vec!["--from", "other/free", "--to", "shop/web", "--port", "8080"],
        config,
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("denied: other/free"));

    // Nothing listens: a clear error, quickly.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let config = support::kubeconfig(dir.path(), &format!("http://{addr}"));
    let started = std::time::Instant::now();
    let out = run(
        vec![
            "--from",
            "a/b",
            "--to",
            "c/d",
            "--port",
            "80",
            "--timeout",
            "5",
        ],
        config,
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "weft policy explain: cannot list namespaces from the Kubernetes API server at http://{addr}/"
        )),
        "{stderr}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    // No configuration at all.
    let out = tokio::task::spawn_blocking(|| {
        weft(&["--from", "a/b", "--to", "c/d", "--port", "80"], &[])
    })
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no Kubernetes configuration"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fake API server takes JSON; the manifests above are YAML.
fn serde_yaml_to_json(doc: &str) -> Value {
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(doc).unwrap();
    serde_json::to_value(value).unwrap()
}

/// Both layers: the controller `weft/controller` (8086, 8080); meshed `shop/api` (sa api,
/// port http 8080) behind Server `shop/api-http` (HTTP/1, accessPolicy deny) with an
/// HTTPRoute `shop/api-books` (GET /books) and AuthorizationPolicy `shop/api-clients`
/// (ServiceAccount front/web, namespace ops); port 9090 behind Server `shop/audit-http`
/// (accessPolicy audit) with AuthorizationPolicy `shop/audit-clients` (namespace front).
/// Clients: `front/web` (meshed, sa web), `front/legacy` (no proxy), `front/locked` (meshed,
/// egress only to api on 8080), `ops/batch` (meshed); `shop/sealed` (meshed, no egress at
/// all). NetworkPolicies: api's ingress from namespace front on 8080 and 9090; locked's
/// and sealed's egress.
const MESH_WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: weft}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {team: front}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops}
---
apiVersion: v1
kind: Pod
metadata: {name: controller, namespace: weft, labels: {app.kubernetes.io/name: weft-controller}}
spec: {containers: [{name: controller, ports: [{containerPort: 8086}, {containerPort: 8080}]}]}
status: {phase: Running, podIP: 10.1.9.9}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec:
  serviceAccountName: api
  containers:
  - name: app
    ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9090}]
  - name: weft-proxy
status: {phase: Running, podIP: 10.1.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: front, labels: {app: web}}
spec: {serviceAccountName: web, containers: [{name: app}, {name: weft-proxy}]}
status: {phase: Running, podIP: 10.1.3.2}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: front, labels: {app: legacy}}
spec: {serviceAccountName: legacy, containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.3.3}
---
apiVersion: v1
kind: Pod
metadata: {name: locked, namespace: front, labels: {app: locked}}
spec: {serviceAccountName: web, containers: [{name: app}, {name: weft-proxy}]}
status: {phase: Running, podIP: 10.1.3.4}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: ops, labels: {app: batch}}
spec: {serviceAccountName: batch, containers: [{name: app}, {name: weft-proxy}]}
status: {phase: Running, podIP: 10.1.4.2}
---
apiVersion: policy.weft.dev/v1alpha1
kind: Server
metadata: {name: api-http, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  port: http
  proxyProtocol: HTTP/1
  accessPolicy: deny
---
apiVersion: policy.weft.dev/v1alpha1
kind: Server
metadata: {name: audit-http, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  port: 9090
  proxyProtocol: HTTP/1
  accessPolicy: audit
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-books, namespace: shop}
spec:
  parentRefs: [{group: policy.weft.dev, kind: Server, name: api-http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /books}, method: GET}]
---
apiVersion: policy.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-clients, namespace: shop}
spec:
  targetRef: {group: policy.weft.dev, kind: Server, name: api-http}
  serviceAccounts: [{name: web, namespace: front}]
  namespaces: [ops]
---
apiVersion: policy.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit-clients, namespace: shop}
spec:
  targetRef: {group: policy.weft.dev, kind: Server, name: audit-http}
  namespaces: [front]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: front}}}]
    ports: [{port: 8080}, {port: 9090}]
---
apiVersion: v1
kind: Pod
metadata: {name: sealed, namespace: shop, labels: {app: sealed}}
spec: {serviceAccountName: sealed, containers: [{name: app, ports: [{containerPort: 8080}]}, {name: weft-proxy}]}
status: {phase: Running, podIP: 10.1.0.20}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sealed-no-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: sealed}}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: locked-egress, namespace: front}
spec:
  podSelector: {matchLabels: {app: locked}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 8080}]
"#;

fn mesh_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), MESH_WORLD).unwrap();
    dir
}

/// `explain` with extra arguments; (exit code, text, JSON).
fn mesh_explain(dir: &Path, args: &[&str]) -> (i32, String, Value) {
    let mut base = vec!["--manifests", dir.to_str().unwrap()];
    base.extend(args);
    let text = weft(&base, &[]);
    base.extend(["-o", "json"]);
    let json = weft(&base, &[]);
    let code = text.status.code().unwrap();
    assert_eq!(code, json.status.code().unwrap());
    assert!(
        text.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&text.stderr)
    );
    (
        code,
        String::from_utf8(text.stdout).unwrap(),
        serde_json::from_slice(&json.stdout).unwrap(),
    )
}

const WEB_ID: &str = "spiffe://cluster.local/ns/front/sa/web";

#[test]
fn both_layers_allow_a_meshed_client_on_its_route() {
    let dir = mesh_dir();
    let (code, text, json) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/web",
            "--to",
            "shop/api",
            "--port",
            "http",
            "--method",
            "GET",
            "--path",
            "/books/1",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(
        text,
        "allowed: front/web (10.1.3.2) -> shop/api (10.1.0.10), port 8080/TCP (port http of shop/api)\n\
         \x20 egress: allowed: no NetworkPolicy isolates front/web for egress\n\
         \x20 ingress: allowed by shop/api-ingress spec.ingress[0] (shop/api is isolated by shop/api-ingress)\n\
         \x20 mesh: allowed by authorizationpolicy/shop/api-clients (server server/shop/api-http, route httproute/shop/api-books/0, request GET /books/1)\n\
         \x20   client: identity spiffe://cluster.local/ns/front/sa/web (meshed pod front/web), from 10.1.3.2\n"
    );
    assert_eq!(
        json["mesh"],
        json!({
            "decision": "allow", "reason": null, "server": "server/shop/api-http",
            "route": "httproute/shop/api-books/0",
            "authorization": "authorizationpolicy/shop/api-clients",
            "identity": WEB_ID, "client_ip": "10.1.3.2", "client_meshed": true,
            "request": {"method": "GET", "path": "/books/1", "assumed": false},
            "audit": false, "detail": null, "notes": [],
        })
    );
    assert_eq!(json["warnings"], json!([]));
    assert_eq!(json["allowed"], true);
    assert_eq!(json["network_policy_allowed"], true);

    // Another method matches no route: 404, exit 1, while NetworkPolicy allows.
    let (code, text, json) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/web",
            "--to",
            "shop/api",
            "--port",
            "8080",
            "--method",
            "POST",
            "--path",
            "/books",
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert!(text.starts_with("denied: "), "{text}");
    assert!(
        text.contains(
            "  mesh: denied: 404 no-route (server server/shop/api-http, request POST /books)\n"
        ),
        "{text}"
    );
    assert_eq!(json["mesh"]["decision"], "no_route");
    assert_eq!(json["network_policy_allowed"], true);
    assert_eq!(json["verdict"], "denied");

    // Without --method/--path, a routed server is asked about GET / and says so.
    let (code, text, json) = mesh_explain(
        dir.path(),
        &["--from", "front/web", "--to", "shop/api", "--port", "8080"],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("request GET / (assumed: give --method and --path)"),
        "{text}"
    );
    assert_eq!(json["mesh"]["request"]["assumed"], true);
}

#[test]
fn mesh_allows_but_network_policy_denies() {
    let dir = mesh_dir();
    // ops is allowed by the AuthorizationPolicy, but api's ingress admits only team=front.
    let (code, text, json) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "ops/batch",
            "--to",
            "shop/api",
            "--port",
            "8080",
            "--path",
            "/books",
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("  ingress: denied: shop/api is isolated by shop/api-ingress"),
        "{text}"
    );
    assert!(
        text.contains("  mesh: allowed by authorizationpolicy/shop/api-clients"),
        "{text}"
    );
    assert!(
        text.ends_with("  warning: the mesh allows this (authorizationpolicy/shop/api-clients), but NetworkPolicy denies it: the connection is dropped at L3/L4 before server/shop/api-http is consulted\n"),
        "{text}"
    );
    assert_eq!(json["mesh"]["decision"], "allow");
    assert_eq!(
        json["mesh"]["identity"],
        "spiffe://cluster.local/ns/ops/sa/batch"
    );
    assert_eq!(json["network_policy_allowed"], false);
    assert_eq!(json["warnings"][0]["kind"], "network-policy-denies");
    assert_eq!(json["warnings"].as_array().unwrap().len(), 1);
}

#[test]
fn mesh_requires_an_identity_the_unmeshed_client_cannot_present() {
    let dir = mesh_dir();
    let (code, text, json) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/legacy",
            "--to",
            "shop/api",
            "--port",
            "8080",
            "--path",
            "/books",
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("  ingress: allowed by shop/api-ingress"),
        "{text}"
    );
    assert!(
        text.contains(
            "  mesh: denied: no authorization allows it (server server/shop/api-http, route httproute/shop/api-books/0, request GET /books)\n\
             \x20   client: unauthenticated 10.1.3.3 (front/legacy has no Weft proxy)\n\
             \x20   proxy: server/shop/api-http: no authorization of the server or of route httproute/shop/api-books/0 allows unauthenticated client 10.1.3.3\n"
        ),
        "{text}"
    );
    assert!(
        text.ends_with("  warning: server/shop/api-http admits mesh identities only on this path, and front/legacy has no Weft proxy, so it connects unauthenticated and is denied; inject the client (weft.dev/inject: enabled) or allow its network\n"),
        "{text}"
    );
    assert_eq!(json["mesh"]["decision"], "deny");
    assert_eq!(json["mesh"]["identity"], Value::Null);
    assert_eq!(json["mesh"]["client_meshed"], false);
    assert_eq!(json["warnings"][0]["kind"], "client-not-meshed");

    // Under audit the same client passes (exit 0), with the warning that enforcing denies it.
    let (code, text, json) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/legacy",
            "--to",
            "shop/api",
            "--port",
            "admin",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("  mesh: audit: no authorization allows it; allowed and counted as audit_deny (the server is in audit mode) (server server/shop/audit-http)\n"), "{text}");
    assert!(
        text.contains("(audit mode lets it through today; enforcing will deny it)"),
        "{text}"
    );
    assert_eq!(json["mesh"]["decision"], "audit_deny");
    assert_eq!(json["mesh"]["audit"], true);
    assert_eq!(json["allowed"], true);
}

#[test]
fn a_proxy_that_cannot_reach_the_controller_is_a_warning() {
    let dir = mesh_dir();
    // locked may reach api on 8080, but its proxy may not reach the controller.
    let (code, text, json) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/locked",
            "--to",
            "shop/api",
            "--port",
            "8080",
            "--path",
            "/books",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("  egress: allowed by front/locked-egress spec.egress[0]"),
        "{text}"
    );
    assert!(
        text.contains("  warning: the client's proxy (front/locked) needs the controller on 8086/TCP (destination and inbound policy) and 8080/TCP (identity: its certificate), and NetworkPolicy denies it: weft/controller denied by the egress of front/locked (isolated by front/locked-egress); allow its egress to the controller's pods on 8086 and 8080\n"),
        "{text}"
    );
    assert_eq!(json["warnings"].as_array().unwrap().len(), 1, "{text}");
    assert_eq!(json["warnings"][0]["kind"], "proxy-cannot-reach-controller");
    // The destination's proxy is checked too: api's egress is not isolated, sealed's is.
    assert!(!text.contains("destination's proxy"), "{text}");
    let (code, text, _) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/web",
            "--to",
            "shop/sealed",
            "--port",
            "8080",
        ],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.ends_with("  warning: the destination's proxy (shop/sealed) needs the controller on 8086/TCP (destination and inbound policy) and 8080/TCP (identity: its certificate), and NetworkPolicy denies it: weft/controller denied by the egress of shop/sealed (isolated by shop/sealed-no-egress); allow its egress to the controller's pods on 8086 and 8080\n"),
        "{text}"
    );
}

#[test]
fn a_bad_path_is_an_error() {
    let dir = mesh_dir();
    let out = weft(
        &[
            "--manifests",
            dir.path().to_str().unwrap(),
            "--from",
            "front/web",
            "--to",
            "shop/api",
            "--port",
            "8080",
            "--path",
            "books",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("\"books\" is not a request path: expected /path, optionally with ?query"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn mesh_is_not_applicable_to_unmeshed_destinations_and_udp() {
    let dir = mesh_dir();
    let (code, _, json) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/web",
            "--to",
            "front/legacy",
            "--port",
            "80",
        ],
    );
    assert_eq!(code, 0);
    assert_eq!(json["mesh"]["decision"], "not_applicable");
    assert_eq!(
        json["mesh"]["reason"],
        "front/legacy has no Weft proxy, so no mesh policy applies"
    );
    let (code, text, _) = mesh_explain(
        dir.path(),
        &[
            "--from",
            "front/web",
            "--to",
            "shop/api",
            "--port",
            "53/UDP",
        ],
    );
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains(
            "  mesh: not applicable: the Weft proxy handles TCP only; UDP passes it by\n"
        ),
        "{text}"
    );
}

/// The kube source lists the mesh's kinds too: the Server, its route and AuthorizationPolicy
/// decide as they do from a directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_the_mesh_from_the_cluster_through_a_kubeconfig() {
    use weft_controller::testing::fake_apiserver::FakeApiServer;

    let fake = FakeApiServer::start().await.unwrap();
    for doc in MESH_WORLD.split("\n---\n") {
        fake.apply(serde_yaml_to_json(doc));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = support::kubeconfig(dir.path(), &format!("http://{}", fake.addr()));
    let out = tokio::task::spawn_blocking(move || {
        weft(
            &[
                "--from",
                "front/web",
                "--to",
                "shop/api",
                "--port",
                "8080",
                "--path",
                "/books",
                "-o",
                "json",
            ],
            &[("KUBECONFIG", config.as_str())],
        )
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["mesh"]["server"], "server/shop/api-http");
    assert_eq!(json["mesh"]["route"], "httproute/shop/api-books/0");
    assert_eq!(
        json["mesh"]["authorization"],
        "authorizationpolicy/shop/api-clients"
    );
    assert_eq!(json["mesh"]["identity"], WEB_ID);
}
