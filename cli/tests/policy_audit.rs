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
use weft_e2e::{Proxy, ProxyOpts};
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
    let token = ca.token(NS, "books")?;
    let mut env = ca.proxy_env(NS, "books", &token);
    env.push(policy.env());
    let mut books = Proxy::spawn(ProxyOpts {
        inbound_target: Some(app),
        env,
        ..Default::default()
    })?;
    books.wait_ready(Duration::from_secs(15))?;
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
        let token = ca.token(ns, sa)?;
        let mut env = ca.proxy_env(ns, sa, &token);
        env.push(ca.controller.env());
        let mut client = Proxy::spawn(ProxyOpts {
            outbound_target: Some(format!("{CLUSTER_IP}:8080").parse()?),
            env,
            ..Default::default()
        })?;
        client.wait_ready(Duration::from_secs(15))?;
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
