//! Inbound authorization end to end: real proxies, a real `weft-controller --dev-ca` for
//! certificates and discovery (the client proxies find the `books` proxy through it and
//! speak mTLS to it), and the `books` proxy's `Policy.ServerPolicy` from the in-test
//! [`PolicyController`], which the tests edit live.
//!
//! Needs `cargo build -p weft-proxy -p weft-controller` first.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::client::{echo_server, Conn, Load};
use weft_e2e::controller::{meshed_service_yaml, DevCa};
use weft_e2e::policy_server::{
    any_authenticated, identities, namespaces, route, server, unauthenticated, PolicyController,
};
use weft_e2e::servers::http_server;
use weft_e2e::{eventually_async, Metrics, Proxy, ProxyOpts};
use weft_proto::policy::{DefaultPolicy, InboundServer, ProtocolKind};

const NS: &str = "books";
const WEB_ID: &str = "spiffe://cluster.local/ns/books/sa/web";
const OTHER_ID: &str = "spiffe://cluster.local/ns/books/sa/other";
const CART_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const HOST: &str = "books.books.svc.cluster.local:8080";
const CLUSTER_IP: &str = "10.96.0.70";
const SERVER: &str = "server/books/books-http";

/// The `books` server proxy in front of `app` (its policy from `policy`), published through
/// the dev-CA controller as a meshed service, and a way to start client proxies.
struct Mesh {
    ca: DevCa,
    policy: PolicyController,
    server: Proxy,
    /// The inbound port the policy is keyed by (the app's port: the original destination).
    port: u16,
    /// The server proxy's access log (JSON lines).
    access_log: std::path::PathBuf,
}

impl Mesh {
    async fn start(name: &str, app: SocketAddr, initial: InboundServer) -> Result<Self> {
        let policy = PolicyController::start().await?;
        policy.set(app.port(), initial);
        let ca = DevCa::start(name, &[])?;
        let access_log = ca.ca.path().join("books-access.log");
        let server = ca.meshed_proxy(
            NS,
            "books",
            false,
            ProxyOpts {
                inbound_target: Some(app),
                env: vec![
                    policy.env(),
                    ("WEFT_PROXY_ACCESS_LOG".into(), "json".into()),
                ],
                stdout: Some(access_log.clone()),
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
                &[(server.inbound, "books")],
                false,
            ),
        )?;
        ca.controller.wait_objects("EndpointSlice", 1.0)?;
        Ok(Self {
            ca,
            policy,
            server,
            port: app.port(),
            access_log,
        })
    }

    /// A client proxy running as `ns`/`sa`, whose app connects to the books service.
    fn client(&self, ns: &str, sa: &str) -> Result<Proxy> {
        client_proxy(&self.ca, ns, sa)
    }

    fn set(&self, s: InboundServer) {
        self.policy.set(self.port, s);
    }
}

/// A client proxy running as `ns`/`sa`, whose app connects to the books service.
fn client_proxy(ca: &DevCa, ns: &str, sa: &str) -> Result<Proxy> {
    ca.meshed_proxy(
        ns,
        sa,
        true,
        ProxyOpts {
            outbound_target: Some(format!("{CLUSTER_IP}:8080").parse()?),
            ..Default::default()
        },
    )
}

fn authz(m: &Metrics, labels: &[(&str, &str)]) -> f64 {
    m.sum("weft_inbound_authz_total", labels)
}

/// GET `path` through `proxy` on a new connection: (status, proxy error, body).
async fn get(proxy: SocketAddr, path: &str) -> Result<(u16, String, String)> {
    let mut c = Conn::open(proxy, false).await?;
    let (status, err, body) = c.get(HOST, path).await?;
    Ok((status, err, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `proxy` with GET `path` until it answers `status`; fails after `within`.
async fn until_status(
    proxy: SocketAddr,
    path: &str,
    status: u16,
    within: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    let mut c = Conn::open(proxy, false).await?;
    loop {
        let (s, _, _) = c.get(HOST, path).await?;
        if s == status {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!(
                "GET {path} through {proxy} did not answer {status} within {within:?} (last {s})"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_namespaces_and_unauthenticated_clients() -> Result<()> {
    let (app, _) = http_server().await?;
    let m = Mesh::start(
        "authz-ids",
        app,
        server(
            SERVER,
            vec![identities("authorizationpolicy/books/web-only", &[WEB_ID])],
        ),
    )
    .await?;
    let web = m.client(NS, "web")?;
    let other = m.client(NS, "other")?;
    let cart = m.client("shop", "cart")?;

    // Exact identity: web is allowed, other is not (403 naming the server and the client).
    let (status, err, body) = get(web.outbound, "/uri").await?;
    assert_eq!((status, err.as_str(), body.as_str()), (200, "", "/uri"));
    let (status, err, body) = get(other.outbound, "/uri").await?;
    assert_eq!((status, err.as_str()), (403, "unauthorized"), "{body}");
    assert!(
        body.contains(&format!(
            "{SERVER}: no authorization allows client {OTHER_ID}"
        )),
        "{body}"
    );
    // gRPC clients get PERMISSION_DENIED, trailers-only, with the same cause.
    let mut h2 = Conn::open(other.outbound, true).await?;
    let denied = h2.grpc_echo(HOST, b"hi").await?.unwrap_err();
    assert!(denied.contains("grpc-status=Some(\"7\")"), "{denied}");
    assert!(
        denied.contains("weft-proxy-error=Some(\"unauthorized\")"),
        "{denied}"
    );
    let mut h2 = Conn::open(web.outbound, true).await?;
    assert_eq!(h2.grpc_echo(HOST, b"hi").await?, Ok(()));

    // Namespace: every identity of shop, and only them.
    m.set(server(
        SERVER,
        vec![namespaces("authorizationpolicy/books/from-shop", &["shop"])],
    ));
    until_status(cart.outbound, "/uri", 200, Duration::from_secs(1)).await?;
    until_status(web.outbound, "/uri", 403, Duration::from_secs(1)).await?;

    // Any authenticated client: both proxies, but not a plaintext client.
    m.set(server(
        SERVER,
        vec![any_authenticated("default:all-authenticated")],
    ));
    until_status(web.outbound, "/uri", 200, Duration::from_secs(1)).await?;
    assert_eq!(get(cart.outbound, "/uri").await?.0, 200);
    let (status, err, body) = get(m.server.inbound, "/uri").await?;
    assert_eq!((status, err.as_str()), (403, "unauthorized"), "{body}");
    assert!(
        body.contains("no authorization allows unauthenticated client 127.0.0.1"),
        "{body}"
    );

    let s = m.server.metrics()?;
    assert!(
        authz(
            &s,
            &[
                ("server", SERVER),
                ("authorization", "authorizationpolicy/books/web-only"),
                ("client_id", WEB_ID),
                ("result", "allow")
            ]
        ) >= 2.0
    );
    assert!(
        authz(
            &s,
            &[
                ("server", SERVER),
                ("client_id", OTHER_ID),
                ("result", "deny")
            ]
        ) >= 2.0
    );
    assert!(authz(&s, &[("client_id", CART_ID), ("result", "allow")]) >= 2.0);
    assert!(authz(&s, &[("client_id", ""), ("result", "deny")]) >= 1.0);
    assert_eq!(s.sum("weft_inbound_policy_streams", &[]), 1.0);
    assert!(s.sum("weft_proxy_errors_total", &[("cause", "unauthorized")]) >= 3.0);
    // The proxy asked for its own workload's port.
    let req = &m.policy.requests()[0];
    assert_eq!(
        (req.port, req.namespace.as_str(), req.pod_name.as_str()),
        (u32::from(m.port), NS, "books-0")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_counts_what_it_would_deny_without_denying() -> Result<()> {
    let (app, stats) = http_server().await?;
    let mut audited = server(
        SERVER,
        vec![identities("authorizationpolicy/books/web-only", &[WEB_ID])],
    );
    audited.audit = true;
    let m = Mesh::start("authz-audit", app, audited).await?;
    let other = m.client(NS, "other")?;
    let mut c = Conn::open(other.outbound, false).await?;
    for _ in 0..5 {
        let (status, err, _) = c.get(HOST, "/uri").await?;
        assert_eq!((status, err.as_str()), (200, ""));
    }
    assert_eq!(get(m.server.inbound, "/uri").await?.0, 200);
    let s = m.server.metrics()?;
    assert_eq!(
        authz(&s, &[("client_id", OTHER_ID), ("result", "audit_deny")]),
        5.0
    );
    assert_eq!(
        authz(&s, &[("client_id", ""), ("result", "audit_deny")]),
        1.0
    );
    assert_eq!(authz(&s, &[("result", "deny")]), 0.0);
    assert_eq!(stats.requests.load(std::sync::atomic::Ordering::Relaxed), 6);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_authorize_by_method_and_path_and_probes_pass_under_deny() -> Result<()> {
    let (app, _) = http_server().await?;
    let routed = InboundServer {
        source: SERVER.into(),
        routes: vec![
            route(
                NS,
                "read",
                "GET",
                "/books",
                vec![namespaces("authorizationpolicy/books/readers", &[NS])],
            ),
            route(
                NS,
                "write",
                "POST",
                "/books",
                vec![identities("authorizationpolicy/books/writer", &[WEB_ID])],
            ),
        ],
        ..Default::default()
    };
    let m = Mesh::start("authz-routes", app, routed).await?;
    let web = m.client(NS, "web")?;
    let other = m.client(NS, "other")?;
    let mut w = Conn::open(web.outbound, false).await?;
    let mut o = Conn::open(other.outbound, false).await?;
    assert_eq!(w.get(HOST, "/books/1").await?.0, 200);
    assert_eq!(o.get(HOST, "/books/1").await?.0, 200);
    assert_eq!(w.post(HOST, "/books", "x".into()).await?.0, 200);
    let (status, err, body) = o.post(HOST, "/books", "x".into()).await?;
    assert_eq!((status, err.as_str()), (403, "unauthorized"));
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains(&format!("{SERVER}: no authorization of the server or of route httproute/books/write/0 allows client {OTHER_ID}")),
        "{body}"
    );
    let (status, err, _) = w.get(HOST, "/shelves").await?;
    assert_eq!((status, err.as_str()), (404, "no-route"));
    let s = m.server.metrics()?;
    assert_eq!(
        authz(
            &s,
            &[
                ("route", "httproute/books/write/0"),
                ("authorization", "authorizationpolicy/books/writer"),
                ("result", "allow")
            ]
        ),
        1.0
    );
    assert_eq!(
        authz(
            &s,
            &[("route", "httproute/books/write/0"), ("result", "deny")]
        ),
        1.0
    );
    // The denial shows in the access log, with its cause, route and client.
    let log = m.access_log.clone();
    eventually_async(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log)?;
        Ok(text.lines().any(|l| {
            l.contains(r#""proxy_error":"unauthorized""#)
                && l.contains(r#""route":"httproute/books/write/0""#)
                && l.contains(&format!(r#""client_id":"{OTHER_ID}""#))
                && l.contains(r#""status":403"#)
        }))
    })
    .await
    .context("no access log line for the denial")?;

    // `deny` as the controller sends it: no authorization, the probe path open to anyone.
    m.set(InboundServer {
        source: "default:deny".into(),
        default_policy: DefaultPolicy::Deny as i32,
        routes: vec![
            route(
                NS,
                "probe",
                "GET",
                "/ready",
                vec![unauthenticated("default:probe")],
            ),
            route(NS, "all", "", "/", vec![]),
        ],
        ..Default::default()
    });
    until_status(web.outbound, "/books/1", 403, Duration::from_secs(1)).await?;
    // A kubelet probe: plaintext, unauthenticated, straight to the inbound port.
    let (status, err, _) = get(m.server.inbound, "/ready").await?;
    assert_eq!((status, err.as_str()), (200, ""));
    assert_eq!(get(m.server.inbound, "/books").await?.0, 403);
    // The admin port is not the app's: never subject to policy.
    assert_eq!(weft_e2e::admin_get(m.server.admin, "/ready")?.0, 200);
    let s = m.server.metrics()?;
    assert_eq!(
        authz(
            &s,
            &[("authorization", "default:probe"), ("result", "allow")]
        ),
        1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_and_passed_through_tls_are_refused_at_accept() -> Result<()> {
    let (app, accepted) = echo_server().await?;
    let policy = PolicyController::start().await?;
    let opaque = |authorizations| InboundServer {
        source: "server/books/books-tcp".into(),
        protocol: ProtocolKind::Opaque as i32,
        authorizations,
        ..Default::default()
    };
    policy.set(
        app.port(),
        opaque(vec![any_authenticated("default:all-authenticated")]),
    );
    let server = Proxy::start(ProxyOpts {
        inbound_target: Some(app),
        env: vec![policy.env(), ("WEFT_PROXY_NAMESPACE".into(), NS.into())],
        ..Default::default()
    })?;
    // Unauthenticated: reset before a byte reaches the app.
    let mut s = TcpStream::connect(server.inbound).await?;
    let _ = s.write_all(b"hello weft\n").await;
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .context("a refused connection must be closed at once")?;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    // An application's own TLS (passed through, never terminated): decided the same way.
    let out = std::process::Command::new("timeout")
        .args(["5", "openssl", "s_client", "-connect"])
        .arg(server.inbound.to_string())
        .args(["-servername", "db.example.com"])
        .stdin(std::process::Stdio::null())
        .output()
        .context("openssl s_client (scripts/setup.sh installs openssl)")?;
    assert!(!out.status.success(), "the TLS client got through");
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 0);
    let m = server.metrics()?;
    assert_eq!(
        authz(
            &m,
            &[
                ("server", "server/books/books-tcp"),
                ("client_id", ""),
                ("result", "deny")
            ]
        ),
        2.0
    );
    assert_eq!(
        m.sum("weft_proxy_errors_total", &[("cause", "unauthorized")]),
        2.0
    );

    // Opened: new connections pass (within a second of the change).
    policy.set(
        app.port(),
        opaque(vec![unauthenticated("authorizationpolicy/books/anyone")]),
    );
    let start = Instant::now();
    loop {
        if weft_e2e::client::echo(server.inbound).await.is_ok() {
            break;
        }
        if start.elapsed() > Duration::from_secs(1) {
            bail!("the opened policy did not apply within 1 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_edit_applies_within_a_second_without_failing_allowed_requests() -> Result<()> {
    let (app, _) = http_server().await?;
    let web_only = || {
        server(
            SERVER,
            vec![identities("authorizationpolicy/books/web", &[WEB_ID])],
        )
    };
    let m = Mesh::start("authz-edit", app, web_only()).await?;
    let web = m.client(NS, "web")?;
    let other = m.client(NS, "other")?;
    let load = Load::start(web.outbound, HOST, false, 200, 4).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for round in 0..3 {
        // Other added (web stays allowed, by another authorization).
        m.set(server(
            SERVER,
            vec![
                identities("authorizationpolicy/books/other", &[OTHER_ID]),
                namespaces("authorizationpolicy/books/same-namespace", &[NS]),
            ],
        ));
        let took = until_status(other.outbound, "/uri", 200, Duration::from_secs(1))
            .await
            .with_context(|| format!("round {round}: allowing other"))?;
        eprintln!("round {round}: allowed after {took:?}");
        // The load keeps running under each policy for a while.
        tokio::time::sleep(Duration::from_millis(150)).await;
        // And removed again.
        m.set(web_only());
        let took = until_status(other.outbound, "/uri", 403, Duration::from_secs(1))
            .await
            .with_context(|| format!("round {round}: denying other"))?;
        eprintln!("round {round}: denied after {took:?}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let ok = load.finish().await?;
    assert!(ok > 100, "{ok}");
    let s = m.server.metrics()?;
    assert!(s.sum("weft_inbound_policy_updates_total", &[]) >= 7.0);
    Ok(())
}

/// The same enforcement with the real controller's `ServerPolicy`: a Server selecting the
/// books pod's port and an AuthorizationPolicy allowing web, from a manifest directory; the
/// pod's readiness probe path stays open to the kubelet under the Server's `deny`; an edit of
/// the policy reaches the proxy within the directory's reload and the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_s_server_and_authorization_policy_are_enforced() -> Result<()> {
    let (app, _) = http_server().await?;
    let port = app.port();
    let ca = DevCa::prepare("authz-controller", &[])?;
    ca.manifests.write(
        "books-pod.yaml",
        &format!(
            "apiVersion: v1\nkind: Pod\n\
             metadata: {{name: books-0, namespace: {NS}, labels: {{app: books}}, annotations: {{weft.dev/inject: enabled}}}}\n\
             spec: {{serviceAccountName: books, containers: [{{name: app, image: app, ports: [{{name: http, containerPort: {port}}}], readinessProbe: {{httpGet: {{path: /ready, port: http}}}}}}]}}\n\
             status: {{podIP: \"127.0.0.1\", phase: Running}}\n"
        ),
    )?;
    ca.manifests.write(
        "server.yaml",
        &format!(
            "apiVersion: policy.weft.dev/v1alpha1\nkind: Server\n\
             metadata: {{name: books-http, namespace: {NS}}}\n\
             spec: {{podSelector: {{matchLabels: {{app: books}}}}, port: http}}\n"
        ),
    )?;
    let policy = |who: &str| {
        format!(
            "apiVersion: policy.weft.dev/v1alpha1\nkind: AuthorizationPolicy\n\
             metadata: {{name: books-clients, namespace: {NS}}}\n\
             spec:\n  targetRef: {{group: policy.weft.dev, kind: Server, name: books-http}}\n  {who}\n"
        )
    };
    ca.manifests.write(
        "authz.yaml",
        &policy(&format!("identities: [\"{WEB_ID}\"]")),
    )?;
    let mut ca = ca;
    ca.controller.launch()?;
    let server = ca.meshed_proxy(
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
            &[(server.inbound, "books")],
            false,
        ),
    )?;
    ca.controller.wait_objects("EndpointSlice", 1.0)?;
    let web = client_proxy(&ca, NS, "web")?;
    let other = client_proxy(&ca, NS, "other")?;
    let (status, err, body) = get(web.outbound, "/uri").await?;
    assert_eq!((status, err.as_str()), (200, ""), "{body}");
    let (status, err, body) = get(other.outbound, "/uri").await?;
    assert_eq!((status, err.as_str()), (403, "unauthorized"), "{body}");
    assert!(
        body.contains(&format!(
            "server/{NS}/books-http: no authorization allows client {OTHER_ID}"
        )),
        "{body}"
    );
    let s = server.metrics()?;
    assert_eq!(
        authz(
            &s,
            &[
                ("server", "server/books/books-http"),
                ("authorization", "authorizationpolicy/books/books-clients"),
                ("client_id", WEB_ID),
                ("result", "allow")
            ]
        ),
        1.0
    );

    // The kubelet's probe passes (the controller's `default:probe`); nothing else unauthenticated.
    let (status, err, _) = get(server.inbound, "/ready").await?;
    assert_eq!((status, err.as_str()), (200, ""));
    assert_eq!(get(server.inbound, "/uri").await?.0, 403);

    // Edited to allow other's ServiceAccount instead: applied after the directory's reload.
    ca.manifests
        .write("authz.yaml", &policy("serviceAccounts: [{name: other}]"))?;
    until_status(other.outbound, "/uri", 200, Duration::from_secs(3)).await?;
    until_status(web.outbound, "/uri", 403, Duration::from_secs(1)).await?;
    Ok(())
}

/// Opaque TCP between meshed proxies (mTLS without ALPN) is decided at accept on the client's
/// verified identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_opaque_tcp_is_decided_on_the_client_identity() -> Result<()> {
    let (app, accepted) = echo_server().await?;
    let m = Mesh::start(
        "authz-mtls-tcp",
        app,
        server(
            SERVER,
            vec![identities("authorizationpolicy/books/web-only", &[WEB_ID])],
        ),
    )
    .await?;
    let web = m.client(NS, "web")?;
    let other = m.client(NS, "other")?;
    drop(weft_e2e::client::echo(web.outbound).await?);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert!(weft_e2e::client::echo(other.outbound).await.is_err());
    assert_eq!(accepted.load(std::sync::atomic::Ordering::Relaxed), 1);
    let s = m.server.metrics()?;
    assert_eq!(
        authz(&s, &[("client_id", WEB_ID), ("result", "allow")]),
        1.0
    );
    assert_eq!(
        authz(&s, &[("client_id", OTHER_ID), ("result", "deny")]),
        1.0
    );
    assert_eq!(
        s.sum(
            "weft_tls_connections_total",
            &[
                ("direction", "inbound"),
                ("tls", "true"),
                ("peer_id", OTHER_ID)
            ]
        ),
        1.0,
        "the denied client came over mTLS"
    );
    Ok(())
}
