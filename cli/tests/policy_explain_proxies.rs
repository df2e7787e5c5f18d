//! `weft policy explain`'s mesh verdict against what real proxies do: a `weft-controller
//! --dev-ca` in directory mode compiles a Server and an AuthorizationPolicy for the `books`
//! proxy; two meshed clients (`books/web`, allowed, and `books/other`) send requests; then
//! `weft policy explain --manifests` on the controller's own directory must give the same
//! answers (allowed by the same authorization, denied with the proxy's message) and the same
//! exit status.
//!
//! Needs `cargo build -p weft-proxy -p weft-controller` first.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use serde_json::Value;
use weft_e2e::client::Conn;
use weft_e2e::controller::{meshed_service_yaml, DevCa};
use weft_e2e::servers::http_server;
use weft_e2e::ProxyOpts;

const NS: &str = "books";
const WEB_ID: &str = "spiffe://cluster.local/ns/books/sa/web";
const OTHER_ID: &str = "spiffe://cluster.local/ns/books/sa/other";
const HOST: &str = "books.books.svc.cluster.local:8080";
const CLUSTER_IP: &str = "10.96.0.72";

fn explain(dir: &std::path::Path, from: &str, port: u16) -> (i32, Value) {
    let port = port.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_weft"))
        .args(["policy", "explain", "--manifests"])
        .arg(dir)
        .args(["--from", from, "--to", "books/books-0", "--port", &port])
        .args(["--method", "GET", "--path", "/uri", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_agrees_with_the_proxy() -> anyhow::Result<()> {
    let (app, _) = http_server().await?;
    let port = app.port();
    let mut ca = DevCa::prepare("policy-explain-proxies", &[])?;
    let pod = |name: &str, sa: &str, ip: &str, ports: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\n\
             metadata: {{name: {name}, namespace: {NS}, labels: {{app: {sa}}}, annotations: {{weft.dev/inject: enabled}}}}\n\
             spec: {{serviceAccountName: {sa}, containers: [{{name: app, image: app{ports}}}]}}\n\
             status: {{podIP: \"{ip}\", phase: Running}}\n"
        )
    };
    let books_ports = format!(", ports: [{{name: http, containerPort: {port}}}]");
    ca.manifests.write(
        "books-pod.yaml",
        &pod("books-0", "books", "127.0.0.1", &books_ports),
    )?;
    ca.manifests
        .write("web-pod.yaml", &pod("web-0", "web", "127.0.0.2", ""))?;
    ca.manifests
        .write("other-pod.yaml", &pod("other-0", "other", "127.0.0.3", ""))?;
    ca.manifests.write(
        "server.yaml",
        &format!(
            "apiVersion: policy.weft.dev/v1alpha1\nkind: Server\n\
             metadata: {{name: books-http, namespace: {NS}}}\n\
             spec: {{podSelector: {{matchLabels: {{app: books}}}}, port: http, proxyProtocol: HTTP/1}}\n"
        ),
    )?;
    ca.manifests.write(
        "authz.yaml",
        &format!(
            "apiVersion: policy.weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: books-clients, namespace: {NS}}}\n\
             spec:\n  targetRef: {{group: policy.weft.dev, kind: Server, name: books-http}}\n  identities: [\"{WEB_ID}\"]\n"
        ),
    )?;
    ca.controller.launch()?;
    let books = ca.meshed_proxy(
        NS,
        "books",
        true,
        ProxyOpts {
            inbound_target: Some(app),
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

    let mut seen = Vec::new();
    for sa in ["web", "other"] {
        let client = ca.meshed_proxy(
            NS,
            sa,
            true,
            ProxyOpts {
                outbound_target: Some(format!("{CLUSTER_IP}:8080").parse()?),
                ..Default::default()
            },
        )?;
        let mut c = Conn::open(client.outbound, false).await?;
        let (status, err, body) = c.get(HOST, "/uri").await?;
        seen.push((status, err, String::from_utf8_lossy(&body).into_owned()));
    }

    // web: the proxy answered 200; explain says allowed by the same authorization.
    assert_eq!((seen[0].0, seen[0].1.as_str()), (200, ""), "{}", seen[0].2);
    let (code, json) = explain(ca.manifests.path(), "books/web-0", port);
    assert_eq!(code, 0, "{json:#}");
    assert_eq!(json["mesh"]["decision"], "allow");
    assert_eq!(json["mesh"]["server"], "server/books/books-http");
    assert_eq!(
        json["mesh"]["authorization"],
        "authorizationpolicy/books/books-clients"
    );
    assert_eq!(json["mesh"]["identity"], WEB_ID);

    // other: 403 from the proxy; explain denies with the proxy's own message (but for the
    // client's address, which is the pod's IP in the manifests and loopback here).
    assert_eq!((seen[1].0, seen[1].1.as_str()), (403, "unauthorized"));
    let (code, json) = explain(ca.manifests.path(), "books/other-0", port);
    assert_eq!(code, 1, "{json:#}");
    assert_eq!(json["mesh"]["decision"], "deny");
    assert_eq!(json["mesh"]["identity"], OTHER_ID);
    let detail = json["mesh"]["detail"].as_str().unwrap();
    let want = format!("server/books/books-http: no authorization allows client {OTHER_ID} (");
    assert!(detail.starts_with(&want), "{detail}");
    assert!(seen[1].2.contains(&want), "{}", seen[1].2);
    Ok(())
}
