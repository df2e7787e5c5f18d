//! Mutual TLS between proxies end to end: a real `weft-controller --dev-ca` issues the
//! certificates and marks the endpoints as meshed; a client proxy (`web`) originates mTLS to a
//! server proxy (`books`), which terminates it because the SNI names its identity. Real
//! `openssl s_client` / `s_server` play foreign clients and an application's own TLS.
//!
//! Needs `cargo build -p weft-proxy -p weft-controller` first, and `openssl` (scripts/setup.sh).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::client::{echo, echo_server, Conn, Load};
use weft_e2e::controller::{meshed_service_yaml, DevCa};
use weft_e2e::pki::{Ca, LeafFiles};
use weft_e2e::servers::http_server;
use weft_e2e::{admin_get, eventually_async, free_addr, Metrics, Proxy, ProxyOpts};

const NS: &str = "books";
const WEB_ID: &str = "spiffe://cluster.local/ns/books/sa/web";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/books/sa/books";
/// The SNI naming the books proxy's identity.
const BOOKS_SNI: &str = "books.books.serviceaccount.identity.cluster.local";
const HOST: &str = "books.books.svc.cluster.local:8080";
const CLUSTER_IP: &str = "10.96.0.50";

/// A server proxy (`sa`) in front of `app`, ready (it holds a certificate).
fn server_proxy(ca: &DevCa, sa: &str, app: SocketAddr) -> Result<Proxy> {
    ca.meshed_proxy(
        NS,
        sa,
        false,
        ProxyOpts {
            inbound_target: Some(app),
            ..Default::default()
        },
    )
}

/// The `web` client proxy, routing through the controller; its listener's original
/// destination is `target` (what the app connected to).
fn client_proxy(ca: &DevCa, target: &str, extra: &[(&str, &str)]) -> Result<Proxy> {
    let mut env = vec![("WEFT_PROXY_DISCOVERY_BACKOFF_MAX".into(), "1s".into())];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    ca.meshed_proxy(
        NS,
        "web",
        true,
        ProxyOpts {
            outbound_target: Some(target.parse()?),
            env,
            ..Default::default()
        },
    )
}

/// Publishes service `name` whose one endpoint is `proxy`'s inbound port, a pod running as
/// `sa`; waits until the controller indexed it (the `nth` service published).
fn publish(
    ca: &DevCa,
    (name, nth): (&str, u32),
    ip: &str,
    port: u16,
    proxy: &Proxy,
    sa: &str,
) -> Result<()> {
    ca.manifests.write(
        &format!("{name}.yaml"),
        &meshed_service_yaml(NS, name, ip, port, &[(proxy.inbound, sa)], false),
    )?;
    ca.controller.wait_objects("EndpointSlice", f64::from(nth))
}

/// The usual pair: a `books` server proxy in front of `app`, published as the books service
/// whose pod runs as `endpoint_sa`, and the `web` client proxy calling it.
fn books_pair(ca: &DevCa, app: SocketAddr, endpoint_sa: &str) -> Result<(Proxy, Proxy)> {
    let server = server_proxy(ca, "books", app)?;
    publish(ca, ("books", 1), CLUSTER_IP, 8080, &server, endpoint_sa)?;
    let client = client_proxy(ca, &format!("{CLUSTER_IP}:8080"), &[])?;
    Ok((server, client))
}

fn tls_connections(m: &Metrics, direction: &str, tls: &str, peer: &str) -> f64 {
    m.sum(
        "weft_tls_connections_total",
        &[("direction", direction), ("tls", tls), ("peer_id", peer)],
    )
}

fn handshake_errors(m: &Metrics, direction: &str, reason: &str) -> f64 {
    m.sum(
        "weft_tls_handshake_errors_total",
        &[("direction", direction), ("reason", reason)],
    )
}

/// Sends one raw HTTP/1.1 request with `extra` header lines; returns the whole response.
async fn raw_get(addr: SocketAddr, path: &str, extra: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\n{extra}connection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .context("response timed out")??;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_clients_cross_the_mesh_over_reused_mtls_h2() -> Result<()> {
    let (app, stats) = http_server().await?;
    let ca = DevCa::start("mtls-http", &[])?;
    let (server, client) = books_pair(&ca, app, "books")?;

    // HTTP/1.1 client: 20 requests on one connection, carried over HTTP/2 between the proxies
    // and handed to the app as HTTP/1.1 again (origin form), with the verified client identity.
    let mut h1 = Conn::open(client.outbound, false).await?;
    for _ in 0..20 {
        let (status, err, body) = h1.get(HOST, "/uri").await?;
        assert_eq!((status, err.as_str()), (200, ""), "{body:?}");
        assert_eq!(&body[..], b"/uri");
    }
    let (status, _, body) = h1.get(HOST, "/headers").await?;
    assert_eq!(status, 200);
    let headers = String::from_utf8_lossy(&body);
    assert!(
        headers.contains(&format!("weft-client-id: {WEB_ID}\n")),
        "{headers}"
    );
    assert!(!headers.contains("weft-orig-proto"), "{headers}");
    // A client cannot claim an identity: the header it sends is replaced.
    let rsp = raw_get(
        client.outbound,
        "/headers",
        "weft-client-id: spiffe://cluster.local/ns/evil/sa/x\r\n",
    )
    .await?;
    assert!(rsp.starts_with("HTTP/1.1 200"), "{rsp}");
    assert!(
        rsp.contains(&format!("weft-client-id: {WEB_ID}\n")),
        "{rsp}"
    );
    assert!(!rsp.contains("evil"), "{rsp}");

    let m = client.metrics()?;
    assert_eq!(tls_connections(&m, "outbound", "true", BOOKS_ID), 1.0);
    // HTTP/2 client: stays HTTP/2 to the app (absolute form).
    let mut h2 = Conn::open(client.outbound, true).await?;
    for _ in 0..10 {
        let (status, _, body) = h2.get(HOST, "/uri").await?;
        assert_eq!(status, 200);
        assert_eq!(&body[..], format!("http://{HOST}/uri").as_bytes());
    }

    // One mTLS connection for HTTP/1 and HTTP/2 clients alike, whatever the request count.
    let m = client.metrics()?;
    assert_eq!(tls_connections(&m, "outbound", "true", BOOKS_ID), 1.0);
    assert_eq!(tls_connections(&m, "outbound", "not-meshed", ""), 0.0);
    let (_, text) = admin_get(client.admin, "/metrics")?;
    assert!(
        !text.contains(r#"tls="true",peer_id="""#),
        "an mTLS series without a peer"
    );
    let s = server.metrics()?;
    assert_eq!(tls_connections(&s, "inbound", "true", WEB_ID), 1.0);
    assert_eq!(tls_connections(&s, "inbound", "plaintext", ""), 0.0);
    assert_eq!(
        s.sum(
            "weft_http_requests_total",
            &[("direction", "inbound"), ("client_id", WEB_ID)]
        ),
        32.0
    );
    assert_eq!(s.sum("weft_tls_handshake_errors_total", &[]), 0.0);
    assert_eq!(m.sum("weft_tls_handshake_errors_total", &[]), 0.0);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 32);
    Ok(())
}

/// `timeout 10 openssl s_client …` against `addr` with `sni`, presenting `leaf` if any,
/// writing `request`; returns stdout and stderr together.
fn s_client(
    addr: SocketAddr,
    sni: &str,
    leaf: Option<&LeafFiles>,
    anchors: &Path,
    alpn: &str,
    request: &str,
) -> Result<String> {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "openssl", "s_client", "-connect"])
        .arg(addr.to_string())
        .args(["-servername", sni, "-tls1_3", "-showcerts", "-ign_eof"])
        .args(["-alpn", alpn])
        .arg("-CAfile")
        .arg(anchors);
    if let Some(l) = leaf {
        cmd.arg("-cert")
            .arg(&l.cert)
            .arg("-key")
            .arg(&l.key)
            .arg("-cert_chain")
            .arg(&l.chain);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running openssl s_client (scripts/setup.sh installs openssl)")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all_sync(request.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

trait WriteAllSync {
    fn write_all_sync(self, b: &[u8]) -> std::io::Result<()>;
}

impl WriteAllSync for std::process::ChildStdin {
    fn write_all_sync(mut self, b: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(&mut self, b)
    }
}

/// The first PEM certificate in `text`.
fn first_pem(text: &str) -> Option<&str> {
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let end = text[start..].find("-----END CERTIFICATE-----")? + start + 25;
    Some(&text[start..end])
}

/// `openssl x509 -noout -ext subjectAltName` of a PEM certificate.
fn san_of(pem: &str) -> Result<String> {
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all_sync(pem.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const GET_HEADERS: &str = "GET /headers HTTP/1.1\r\nHost: books\r\nConnection: close\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_sees_the_chain_and_spiffe_san_and_bad_clients_are_refused() -> Result<()> {
    let (app, stats) = http_server().await?;
    let ca = DevCa::start("mtls-openssl", &[])?;
    let server = server_proxy(&ca, "books", app)?;
    let dir = ca.ca.path();
    let issuer = Ca::dev_ca_issuer(dir)?;
    let prober = "spiffe://cluster.local/ns/books/sa/prober";

    // A mesh client: the chain verifies to the anchors, the leaf names the books identity,
    // and the request reaches the app with the prober's identity.
    let good = issuer.valid_leaf(dir, "prober", prober)?;
    let out = s_client(
        server.inbound,
        BOOKS_SNI,
        Some(&good),
        &ca.anchors(),
        "http/1.1",
        GET_HEADERS,
    )?;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains(" 0 s:") && out.contains(" 1 s:"),
        "chain: {out}"
    );
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains(&format!("weft-client-id: {prober}")), "{out}");
    let san = san_of(first_pem(&out).context("no certificate in the s_client output")?)?;
    assert!(san.contains(&format!("URI:{BOOKS_ID}")), "{san}");
    assert_eq!(stats.requests.load(Ordering::Relaxed), 1);

    // Refused: a leaf from a stranger's CA, an expired leaf from the real issuer, no leaf.
    let stranger = Ca::root("stranger")?.valid_leaf(dir, "stranger", prober)?;
    let now = SystemTime::now();
    let expired = issuer.leaf(
        dir,
        "expired",
        prober,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    )?;
    for (leaf, reason, alert) in [
        (Some(&stranger), "untrusted", "unknown ca"),
        (Some(&expired), "expired", "certificate expired"),
        (None, "no-client-certificate", "certificate required"),
    ] {
        let out = s_client(
            server.inbound,
            BOOKS_SNI,
            leaf,
            &ca.anchors(),
            "http/1.1",
            GET_HEADERS,
        )?;
        assert!(!out.contains("HTTP/1.1 200"), "{reason}: {out}");
        assert!(
            out.contains(alert),
            "{reason}: expected alert {alert:?}: {out}"
        );
        let m = server.metrics()?;
        assert_eq!(handshake_errors(&m, "inbound", reason), 1.0, "{reason}");
    }
    assert_eq!(stats.requests.load(Ordering::Relaxed), 1);
    // The proxy keeps serving mesh clients.
    let out = s_client(
        server.inbound,
        BOOKS_SNI,
        Some(&good),
        &ca.anchors(),
        "h2",
        "",
    )?;
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let m = server.metrics()?;
    assert_eq!(tls_connections(&m, "inbound", "true", prober), 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_wrong_identity_is_refused_and_counted() -> Result<()> {
    let (app, stats) = http_server().await?;
    let ca = DevCa::start("mtls-wrong-id", &[])?;
    // The controller says the endpoint runs as `ledger`; the proxy there is `books`.
    let (_server, client) = books_pair(&ca, app, "ledger")?;
    let mut h1 = Conn::open(client.outbound, false).await?;
    let (status, err, body) = h1.get(HOST, "/uri").await?;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(
        (status, err.as_str()),
        (502, "tls-handshake-failed"),
        "{body}"
    );
    assert!(
        body.contains("spiffe://cluster.local/ns/books/sa/ledger")
            && body.contains("wrong-identity"),
        "{body}"
    );
    let m = client.metrics()?;
    assert!(handshake_errors(&m, "outbound", "wrong-identity") >= 1.0);
    assert_eq!(
        tls_connections(
            &m,
            "outbound",
            "true",
            "spiffe://cluster.local/ns/books/sa/ledger"
        ),
        0.0
    );
    assert_eq!(stats.requests.load(Ordering::Relaxed), 0);
    Ok(())
}

/// `openssl s_server -www` with its own certificate: an application terminating its own TLS.
struct SServer(std::process::Child);

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_not_addressed_to_the_mesh_passes_through_untouched() -> Result<()> {
    let ca = DevCa::start("mtls-passthrough", &[])?;
    let dir = ca.ca.path();
    let app_ca = Ca::root("app-own-ca")?;
    let app_leaf = app_ca.valid_leaf(dir, "app", "https://app.example/")?;
    std::fs::write(dir.join("app-ca.pem"), &app_ca.cert_pem)?;
    let app = free_addr()?;
    let _s_server = SServer(
        Command::new("openssl")
            .args(["s_server", "-accept"])
            .arg(app.to_string())
            .arg("-cert")
            .arg(&app_leaf.cert)
            .arg("-key")
            .arg(&app_leaf.key)
            .args(["-www", "-tls1_3", "-quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("running openssl s_server")?,
    );
    eventually_async(Duration::from_secs(10), || {
        Ok(std::net::TcpStream::connect(app).is_ok())
    })
    .await?;
    let server = server_proxy(&ca, "books", app)?;
    let out = s_client(
        server.inbound,
        "app.example",
        None,
        &dir.join("app-ca.pem"),
        "http/1.1",
        "GET / HTTP/1.0\r\n\r\n",
    )?;
    // The client talked to the app's TLS: its certificate, verified against the app's CA.
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("app-own-ca"), "{out}");
    assert!(out.contains("HTTP/1.0 200 ok"), "{out}");
    let m = server.metrics()?;
    assert_eq!(tls_connections(&m, "inbound", "passthrough", ""), 1.0);
    assert_eq!(m.sum("weft_tls_handshake_errors_total", &[]), 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_between_meshed_proxies_is_mtls_per_connection() -> Result<()> {
    let (echo_addr, accepted) = echo_server().await?;
    let ca = DevCa::start("mtls-tcp", &[])?;
    let server = server_proxy(&ca, "db", echo_addr)?;
    publish(&ca, ("db", 1), "10.96.0.51", 7000, &server, "db")?;
    let client = client_proxy(
        &ca,
        "10.96.0.51:7000",
        &[("WEFT_PROXY_OPAQUE_PORTS", "7000")],
    )?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(echo(client.outbound).await?);
    }
    drop(held);
    assert_eq!(accepted.load(Ordering::Relaxed), 3);
    let db = "spiffe://cluster.local/ns/books/sa/db";
    let m = client.metrics()?;
    assert_eq!(tls_connections(&m, "outbound", "true", db), 3.0);
    let s = server.metrics()?;
    assert_eq!(tls_connections(&s, "inbound", "true", WEB_ID), 3.0);
    Ok(())
}

/// Writes `content` to `path` atomically (the readers poll the files).
fn replace(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn anchors_of(p: &Proxy) -> Result<f64> {
    Ok(p.metrics()?.sum("weft_identity_trust_anchors", &[]))
}

/// The TLS, identity and TCP series of each proxy, for a failure message.
fn tls_state(admins: &[(&str, SocketAddr)]) -> String {
    let mut out = String::new();
    for (name, admin) in admins {
        match admin_get(*admin, "/metrics") {
            Ok((_, text)) => {
                for l in text.lines().filter(|l| {
                    !l.starts_with('#')
                        && (l.starts_with("weft_tls_")
                            || l.starts_with("weft_identity_")
                            || l.starts_with("weft_tcp_connections"))
                }) {
                    out.push_str(&format!("{name}: {l}\n"));
                }
            }
            Err(e) => out.push_str(&format!("{name}: /metrics unreadable: {e:#}\n")),
        }
    }
    out
}

fn certified(p: &Proxy) -> Result<f64> {
    Ok(p.metrics()?
        .sum("weft_identity_certify_total", &[("result", "ok")]))
}

/// Trust-anchor rotation under steady load: add a root, re-issue the issuer under it, let
/// every proxy move to the new issuer while peers still hold old-issuer certificates (new
/// mTLS connections across the two must keep working), then remove the old root. HTTP load
/// and fresh TCP connections (each a new mTLS handshake) run throughout: nothing may fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_anchor_rotation_under_load_fails_nothing() -> Result<()> {
    let (app, _) = http_server().await?;
    let (echo_addr, _) = echo_server().await?;
    // 60 s certificates (the shortest the controller issues): renewal at about 42 s.
    let ca = DevCa::start(
        "mtls-rotation",
        &[
            "--cert-lifetime",
            "60s",
            "--issuer-reload-interval",
            "200ms",
        ],
    )?;
    let books = server_proxy(&ca, "books", app)?;
    let db = server_proxy(&ca, "db", echo_addr)?;
    publish(&ca, ("books", 1), CLUSTER_IP, 8080, &books, "books")?;
    publish(&ca, ("db", 2), "10.96.0.51", 7000, &db, "db")?;
    let dir = ca.ca.path().to_path_buf();
    let old_root = std::fs::read_to_string(ca.anchors())?;

    // 1. Add the new root everywhere; 2. re-issue the issuer under it.
    let new_root = Ca::root("weft rotation root 2")?;
    let (new_issuer, new_key) = new_root.intermediate("weft rotation issuer 2")?;
    replace(&ca.anchors(), &format!("{old_root}{}", new_root.cert_pem))?;
    for p in [&books, &db] {
        eventually_async(Duration::from_secs(5), || Ok(anchors_of(p)? == 2.0)).await?;
    }
    let ctl_admin = ca.controller.admin;
    let controller = |name: &str, labels: &[(&str, &str)]| -> Result<f64> {
        let (_, body) = admin_get(ctl_admin, "/metrics")?;
        Ok(Metrics::parse(&body).sum(name, labels))
    };
    let reloads_ok = || {
        controller(
            "weft_controller_identity_issuer_reloads_total",
            &[("result", "ok")],
        )
    };
    // The controller's reload of the bundle counts as an issuer reload too: wait for it, so
    // that the count below moves only for the new issuer (web and tcp-web, started next,
    // must get new-issuer certificates).
    eventually_async(Duration::from_secs(5), || {
        Ok(controller("weft_controller_identity_trust_anchors", &[])? == 2.0)
    })
    .await?;
    let before = reloads_ok()?;
    replace(&dir.join("issuer.key"), &new_key)?;
    replace(&dir.join("issuer.crt"), &new_issuer.cert_pem)?;
    // A reload between the two writes (new key, old certificate) fails validation and keeps
    // the old issuer, so a successful one means both files are in use.
    eventually_async(Duration::from_secs(5), || Ok(reloads_ok()? > before)).await?;

    // The client proxy starts now: its certificate comes from the new issuer, while books
    // and db still hold old-issuer ones until they renew.
    let web = client_proxy(&ca, &format!("{CLUSTER_IP}:8080"), &[])?;
    let tcp_web = client_proxy(
        &ca,
        "10.96.0.51:7000",
        &[("WEFT_PROXY_OPAQUE_PORTS", "7000")],
    )?;
    let load = Load::start(web.outbound, HOST, false, 200, 4).await?;
    let mut tcp_ok = 0u32;
    let tcp_addr = tcp_web.outbound;
    let admins = [("tcp-web", tcp_web.admin), ("db", db.admin)];
    let handshake = || async move {
        match echo(tcp_addr).await {
            Ok(s) => {
                drop(s);
                Ok(())
            }
            Err(e) => Err(e.context(format!(
                "an opaque mTLS connection tcp-web -> db failed; their TLS state:\n{}",
                tls_state(&admins)
            ))),
        }
    };
    // Overlap: new handshakes between a new-issuer client and old-issuer servers.
    for _ in 0..10 {
        handshake().await?;
        tcp_ok += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        certified(&books)?,
        1.0,
        "books renewed too early for the test"
    );

    // The servers renew (at ~70 % of 60 s) onto the new issuer; handshakes keep working.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while certified(&books)? < 2.0 || certified(&db)? < 2.0 {
        if tokio::time::Instant::now() > deadline {
            bail!("the server proxies did not renew within 60 s");
        }
        handshake().await?;
        tcp_ok += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 3. Remove the old root.
    replace(&ca.anchors(), &new_root.cert_pem)?;
    for p in [&books, &db, &web, &tcp_web] {
        eventually_async(Duration::from_secs(5), || Ok(anchors_of(p)? == 1.0)).await?;
    }
    for _ in 0..10 {
        handshake().await?;
        tcp_ok += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ok = load.finish().await?;
    assert!(ok > 1000, "only {ok} requests completed");
    // The servers now present new-issuer chains: they verify against the new root alone.
    let probe = new_issuer.valid_leaf(&dir, "probe", "spiffe://cluster.local/ns/books/sa/probe")?;
    let new_only = dir.join("new-root.pem");
    std::fs::write(&new_only, &new_root.cert_pem)?;
    let out = s_client(books.inbound, BOOKS_SNI, Some(&probe), &new_only, "h2", "")?;
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let m = tcp_web.metrics()?;
    assert_eq!(
        tls_connections(
            &m,
            "outbound",
            "true",
            "spiffe://cluster.local/ns/books/sa/db"
        ),
        f64::from(tcp_ok)
    );
    for (name, p) in [
        ("books", &books),
        ("db", &db),
        ("web", &web),
        ("tcp-web", &tcp_web),
    ] {
        let (_, text) = admin_get(p.admin, "/metrics")?;
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("weft_tls_handshake_errors_total"))
            .collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
    Ok(())
}

/// Once its certificate has expired (the controller is gone, so it cannot renew), a proxy
/// neither originates nor accepts mTLS, established connections included: requests get 503
/// `identity-unavailable` and TLS clients are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_stops_mtls_both_ways() -> Result<()> {
    let (app, stats) = http_server().await?;
    let mut ca = DevCa::start("mtls-expiry", &["--cert-lifetime", "60s"])?;
    let (server, client) = books_pair(&ca, app, "books")?;
    let mut conn = Conn::open(client.outbound, false).await?;
    assert_eq!(conn.get(HOST, "/uri").await?.0, 200);
    let prober = Ca::dev_ca_issuer(ca.ca.path())?.valid_leaf(
        ca.ca.path(),
        "prober",
        "spiffe://cluster.local/ns/books/sa/prober",
    )?;
    ca.controller.kill()?;

    for p in [&client, &server] {
        let admin = p.admin;
        eventually_async(Duration::from_secs(90), || {
            let (status, body) = admin_get(admin, "/ready")?;
            Ok(status == 503 && body.contains("certificate expired"))
        })
        .await?;
    }
    // The pooled mTLS connection to the server proxy carries no more requests (the app's
    // connections share it), and no new one is made.
    drop(conn);
    let mut fresh = Conn::open(client.outbound, false).await?;
    let (status, err, body) = fresh.get(HOST, "/uri").await?;
    assert_eq!(
        (status, err.as_str()),
        (503, "identity-unavailable"),
        "{body:?}"
    );
    assert!(
        String::from_utf8_lossy(&body).contains("certificate expired"),
        "{body:?}"
    );
    let m = client.metrics()?;
    assert_eq!(tls_connections(&m, "outbound", "true", BOOKS_ID), 1.0);
    // The server refuses TLS clients it would have accepted before.
    let out = s_client(
        server.inbound,
        BOOKS_SNI,
        Some(&prober),
        &ca.anchors(),
        "http/1.1",
        GET_HEADERS,
    )?;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    let s = server.metrics()?;
    assert!(handshake_errors(&s, "inbound", "no-local-certificate") >= 1.0);
    assert_eq!(s.sum("weft_identity_ready", &[]), 0.0);
    assert_eq!(client.metrics()?.sum("weft_identity_ready", &[]), 0.0);
    assert_eq!(stats.requests.load(Ordering::Relaxed), 1);
    Ok(())
}

/// A WebSocket upgrade cannot ride HTTP/2: between meshed proxies it takes an HTTP/1.1 mTLS
/// connection (ALPN `http/1.1`), and the upgraded stream is relayed over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_cross_the_mesh_over_http1_mtls() -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let ca = DevCa::start("mtls-websocket", &[])?;
    let (server, client) = books_pair(&ca, app, "books")?;
    let tcp = TcpStream::connect(client.outbound).await?;
    let (mut ws, rsp) = tokio_tungstenite::client_async(format!("ws://{HOST}/chat"), tcp).await?;
    assert_eq!(rsp.status(), 101);
    for i in 0..5 {
        ws.send(Message::text(format!("message {i}"))).await?;
        let echo = ws.next().await.context("closed")??;
        assert_eq!(echo.into_text()?.as_str(), format!("message {i}"));
    }
    ws.close(None).await?;
    assert_eq!(
        tls_connections(&client.metrics()?, "outbound", "true", BOOKS_ID),
        1.0
    );
    assert_eq!(
        tls_connections(&server.metrics()?, "inbound", "true", WEB_ID),
        1.0
    );
    Ok(())
}
