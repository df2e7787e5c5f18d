//! `weft policy audit` end to end: a real server proxy in audit mode (its policy from the
//! in-test Policy controller, certificates and discovery from a real `weft-controller
//! --dev-ca`), two meshed clients with different identities and one unauthenticated client;
//! the `weft` binary scrapes the server proxy and prints the AuthorizationPolicy, which must
//! parse with weft-model's types and list exactly the two identities.
//!
//! Needs `cargo build -p weft-proxy -p weft-controller` first.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use serde::Deserialize as _;
use weft_e2e::client::Conn;
use weft_e2e::controller::{meshed_service_yaml, DevCa};
use weft_e2e::policy_server::{identities, server, PolicyController};
use weft_e2e::servers::http_server;
use weft_e2e::ProxyOpts;
use weft_model::authz::AuthorizationPolicy;

const NS: &str = "books";
const WEB_ID: &str = "spiffe://cluster.local/ns/books/sa/web";
const CART_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const HOST: &str = "books.books.svc.cluster.local:8080";
const CLUSTER_IP: &str = "10.96.0.71";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_prints_the_identities_the_proxies_saw() -> anyhow::Result<()> {
    let (app, _) = http_server().await?;
    let policy = PolicyController::start().await?;
    let mut audited = server(
        "server/books/books-http",
        vec![identities("authorizationpolicy/books/web-only", &[WEB_ID])],
    );
    audited.audit = true;
    policy.set(app.port(), audited);
    let ca = DevCa::start("policy-audit", &[])?;
    let books = ca.meshed_proxy(
        NS,
        "books",
        false,
        ProxyOpts {
            inbound_target: Some(app),
            env: vec![policy.env()],
            ..Default::default()
        },
    )?;
    ca.manifests.write(
        "books.yaml",
        &meshed_service_yaml(
            NS,
            "books",
            CLUSTER_IP,
            8080,
            &[(books.inbound, "books")],
            false,
        ),
    )?;
    ca.controller.wait_objects("EndpointSlice", 1.0)?;

    // web is allowed, cart only audited; both succeed. One request without a proxy.
    for (ns, sa, n) in [(NS, "web", 3), ("shop", "cart", 2)] {
        let client = ca.meshed_proxy(
            ns,
            sa,
            true,
            ProxyOpts {
                outbound_target: Some(format!("{CLUSTER_IP}:8080").parse()?),
                ..Default::default()
            },
        )?;
        let mut c = Conn::open(client.outbound, false).await?;
        for _ in 0..n {
            let (status, err, _) = c.get(HOST, "/uri").await?;
            assert_eq!((status, err.as_str()), (200, ""));
        }
    }
    let mut c = Conn::open(books.inbound, false).await?;
    assert_eq!(c.get(HOST, "/uri").await?.0, 200);

    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "audit", NS, "--from-proxies"])
        .arg(books.admin.to_string())
        .output()?;
    let yaml = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{yaml}");
    println!("{yaml}");

    let mut policies = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let value = serde_yaml_ng::Value::deserialize(doc)?;
        if value.is_null() {
            continue; // a document of comments only
        }
        let a: AuthorizationPolicy = serde_yaml_ng::from_value(value)?;
        weft_model::convert::authorization_policy(&a, NS)?;
        policies.push(a);
    }
    assert_eq!(policies.len(), 1, "{yaml}");
    let a = &policies[0];
    assert_eq!(a.metadata.namespace.as_deref(), Some(NS));
    assert_eq!(
        (
            a.spec.target_ref.kind.as_str(),
            a.spec.target_ref.name.as_str()
        ),
        ("Server", "books-http")
    );
    // Sorted: books/web before shop/cart.
    assert_eq!(a.spec.identities, [WEB_ID, CART_ID]);
    assert!(a.spec.networks.is_empty() && !a.spec.unauthenticated);
    assert!(
        yaml.contains(&format!("  - \"{WEB_ID}\"  # 3 allowed\n")),
        "{yaml}"
    );
    assert!(
        yaml.contains(&format!(
            "  - \"{CART_ID}\"  # 2 audit-denied (denied once enforced without this)\n"
        )),
        "{yaml}"
    );
    assert!(
        yaml.contains("1 unauthenticated requests or connections.\n# Their addresses are not in the proxies' counters"),
        "{yaml}"
    );

    // The same proxy found from the cluster state: the namespace's meshed pods, on their IP
    // and the admin port.
    let state = tempfile::tempdir()?;
    std::fs::write(
        state.path().join("books.yaml"),
        "apiVersion: v1\nkind: Pod\n\
         metadata: {name: books-0, namespace: books, labels: {app: books}}\n\
         spec: {containers: [{name: app}, {name: weft-proxy}]}\n\
         status: {phase: Running, podIP: 127.0.0.1}\n",
    )?;
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "audit", NS, "--source"])
        .arg(format!("dir:{}", state.path().display()))
        .args(["--admin-port", &books.admin.port().to_string()])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8(out.stdout)?, yaml);
    Ok(())
}

#[test]
fn an_unreachable_proxy_is_an_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "audit", NS, "--from-proxies", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("weft policy audit: scraping 127.0.0.1:1/metrics: cannot connect"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "audit", NS])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "weft policy audit: nothing to read: give --from-proxies ADDR..., or --source to find the namespace's proxies\n"
    );
}

/// `api-1` and `api-2` (one workload, app=api) in `shop`, `web` in `front`.
const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: front}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api, pod-template-hash: abc}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api-2, namespace: shop, labels: {app: api, pod-template-hash: def}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: front, labels: {app: web}}
spec: {containers: [{name: app}]}
status: {phase: Running, podIP: 10.1.3.2}
"#;

/// Flow records as `weft cni flows -o json` prints them.
const FLOWS: &str = r#"{"time":"2026-12-05T21:00:00.000Z","verdict":"allow","direction":"ingress","protocol":"TCP","src":{"ip":"10.1.3.2","port":40000,"namespace":"front","pod":"web"},"dst":{"ip":"10.1.0.10","port":8080,"namespace":"shop","pod":"api-1"},"endpoint":{"namespace":"shop","pod":"api-1"},"reason":"policy","policy":null,"isolated_by":[]}
{"time":"2026-12-05T21:00:01.000Z","verdict":"allow","direction":"ingress","protocol":"TCP","src":{"ip":"10.1.3.2","port":40001,"namespace":"front","pod":"web"},"dst":{"ip":"10.1.0.11","port":8080,"namespace":"shop","pod":"api-2"},"endpoint":{"namespace":"shop","pod":"api-2"},"reason":"policy","policy":null,"isolated_by":[]}
{"time":"2026-12-05T21:00:02.000Z","verdict":"allow","direction":"ingress","protocol":"TCP","src":{"ip":"192.168.7.1","port":40002},"dst":{"ip":"10.1.0.10","port":9090,"namespace":"shop","pod":"api-1"},"endpoint":{"namespace":"shop","pod":"api-1"},"reason":"policy","policy":null,"isolated_by":[]}
{"time":"2026-12-05T21:00:03.000Z","verdict":"deny","direction":"ingress","protocol":"TCP","src":{"ip":"10.1.3.2","port":40003,"namespace":"front","pod":"web"},"dst":{"ip":"10.1.0.10","port":22,"namespace":"shop","pod":"api-1"},"endpoint":{"namespace":"shop","pod":"api-1"},"reason":"policy","policy":null,"isolated_by":["shop/x"]}
"#;

fn network_policies(yaml: &str) -> Vec<k8s_openapi::api::networking::v1::NetworkPolicy> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        if value.is_null() {
            continue;
        }
        let np: k8s_openapi::api::networking::v1::NetworkPolicy =
            serde_yaml_ng::from_value(value).unwrap();
        weft_model::netpol::network_policy(&np, "").unwrap();
        out.push(np);
    }
    out
}

fn world_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("world.yaml"), WORLD).unwrap();
    dir
}

#[test]
fn flows_from_a_file_give_one_network_policy_per_workload() {
    let dir = world_dir();
    let flows = dir.path().join("flows.ndjson");
    std::fs::write(&flows, FLOWS).unwrap();
    let source = format!("dir:{}", dir.path().display());
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "audit", "shop", "--source", &source, "--flows"])
        .arg(&flows)
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        yaml,
        "# From the CNI's flows to 2 pod(s) of this workload: api-1, api-2.\n\
         apiVersion: networking.k8s.io/v1\n\
         kind: NetworkPolicy\n\
         metadata:\n  name: \"api-audited\"\n  namespace: \"shop\"\n\
         spec:\n  podSelector: {matchLabels: {\"app\": \"api\"}}\n  policyTypes: [Ingress]\n  ingress:\n\
         \x20 - from: [{namespaceSelector: {matchLabels: {\"kubernetes.io/metadata.name\": \"front\"}}, podSelector: {matchLabels: {\"app\": \"web\"}}}]  # 2 flows\n\
         \x20   ports: [{protocol: TCP, port: 8080}]\n\
         \x20 - from: [{ipBlock: {cidr: \"192.168.7.1/32\"}}]  # 1 flows\n\
         \x20   ports: [{protocol: TCP, port: 9090}]\n"
    );
    assert_eq!(network_policies(&yaml).len(), 1);
}

#[test]
fn flows_from_a_live_agent_are_read_for_the_duration() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A fake agent: answers /flows with a chunked NDJSON stream it keeps open.
    let agent = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 1024];
        let n = s.read(&mut req).unwrap();
        assert!(String::from_utf8_lossy(&req[..n]).starts_with("GET /flows "));
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap();
        // Each record split over two chunks.
        for line in FLOWS.lines() {
            let line = format!("{line}\n");
            let (a, b) = line.split_at(line.len() / 2);
            for part in [a, b] {
                write!(s, "{:x}\r\n{part}\r\n", part.len()).unwrap();
            }
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let dir = world_dir();
    let source = format!("dir:{}", dir.path().display());
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args([
            "policy",
            "audit",
            "shop",
            "--source",
            &source,
            "--duration",
            "1",
            "--agents",
        ])
        .arg(addr.to_string())
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let nps = network_policies(&yaml);
    assert_eq!(nps.len(), 1, "{yaml}");
    assert!(yaml.contains("# 2 flows\n"), "{yaml}");
    agent.join().unwrap();
}

/// Serves `body` on the first request to `path`, as a proxy's admin port would.
fn fake_admin(body: String) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 1024];
        let _ = s.read(&mut req).unwrap();
        write!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
    });
    addr
}

#[test]
fn unauthenticated_clients_get_the_addresses_of_flows_to_the_server_s_port_only() {
    let dir = world_dir();
    std::fs::write(
        dir.path().join("server.yaml"),
        "apiVersion: policy.weft.dev/v1alpha1\nkind: Server\n\
         metadata: {name: api-http, namespace: shop}\n\
         spec: {podSelector: {matchLabels: {app: api}}, port: 8080, accessPolicy: audit}\n",
    )
    .unwrap();
    // 192.168.7.1 reached api on 8080 (the Server's port); 192.168.7.2 on 9090 (not it).
    let flows: String = [
        ("192.168.7.1", "10.1.0.10", "api-1", 8080),
        ("192.168.7.1", "10.1.0.11", "api-2", 8080),
        ("192.168.7.2", "10.1.0.10", "api-1", 9090),
    ]
    .iter()
    .map(|(src, dst, pod, port)| {
        format!(
            "{{\"verdict\":\"allow\",\"protocol\":\"TCP\",\"src\":{{\"ip\":\"{src}\",\"port\":40000}},\"dst\":{{\"ip\":\"{dst}\",\"port\":{port},\"namespace\":\"shop\",\"pod\":\"{pod}\"}}}}\n"
        )
    })
    .collect();
    let flows_file = dir.path().join("flows.ndjson");
    std::fs::write(&flows_file, flows).unwrap();
    let proxy = fake_admin(
        "# TYPE weft_inbound_authz_total counter\n\
         weft_inbound_authz_total{server=\"server/shop/api-http\",route=\"\",authorization=\"\",client_id=\"\",result=\"audit_deny\"} 2\n"
            .into(),
    );
    let source = format!("dir:{}", dir.path().display());
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "audit", "shop", "--source", &source, "--flows"])
        .arg(&flows_file)
        .arg("--from-proxies")
        .arg(proxy.to_string())
        .output()
        .unwrap();
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut policies = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let value = serde_yaml_ng::Value::deserialize(doc).unwrap();
        if value.get("kind").and_then(|k| k.as_str()) == Some("AuthorizationPolicy") {
            let a: AuthorizationPolicy = serde_yaml_ng::from_value(value).unwrap();
            weft_model::convert::authorization_policy(&a, "").unwrap();
            policies.push(a);
        }
    }
    assert_eq!(policies.len(), 1, "{yaml}");
    let a = &policies[0];
    assert_eq!(a.spec.target_ref.name, "api-http");
    assert!(a.spec.unauthenticated, "{yaml}");
    let nets: Vec<&str> = a.spec.networks.iter().map(|n| n.cidr.as_str()).collect();
    assert_eq!(nets, ["192.168.7.1/32"], "{yaml}");
    assert!(
        yaml.contains("  - cidr: \"192.168.7.1/32\"  # 2 flows\n"),
        "{yaml}"
    );
}
