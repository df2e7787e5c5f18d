//! `GET /tap` on the admin port end to end: real proxies on loopback, a real controller with
//! a development CA for the identities, and the tap read the way `weft tap` reads it
//! (streamed NDJSON over HTTP/1.1), or by `openssl s_client` for the mTLS cases.
//!
//! Needs `cargo build --bins -p weft-proxy -p weft-controller` first, and `openssl`.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use weft_e2e::client::Conn;
use weft_e2e::controller::{meshed_service_yaml, DevCa};
use weft_e2e::pki::Ca;
use weft_e2e::servers::http_server;
use weft_e2e::{admin_get, eventually, free_addr, Proxy, ProxyOpts};

const NS: &str = "books";
const WEB_ID: &str = "spiffe://cluster.local/ns/books/sa/web";
const BOOKS_ID: &str = "spiffe://cluster.local/ns/books/sa/books";
const CONTROLLER_ID: &str = "spiffe://cluster.local/ns/weft/sa/weft-controller";
const HOST: &str = "books.books.svc.cluster.local:8080";
const CLUSTER_IP: &str = "10.96.0.50";

/// An open tap: the response head arrived, so the proxy has registered it.
struct Tap {
    body: Incoming,
    buf: Vec<u8>,
}

impl Tap {
    /// `GET /tap?query` on `admin`; fails unless 200.
    async fn open(admin: SocketAddr, query: &str) -> Result<Self> {
        Self::open_with(admin, query, None).await
    }

    /// [`Tap::open`] on a socket with a receive buffer of `rcvbuf` bytes.
    async fn open_with(admin: SocketAddr, query: &str, rcvbuf: Option<u32>) -> Result<Self> {
        let (status, rsp) = tap_request(admin, query, rcvbuf).await?;
        if status != 200 {
            let body = rsp.collect().await?.to_bytes();
            bail!(
                "/tap?{query} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        Ok(Self {
            body: rsp,
            buf: Vec::new(),
        })
    }

    /// The next NDJSON object, or `None` when the stream ended.
    async fn next(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(Some(serde_json::from_slice(&line)?));
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame())
                .await
                .context("no tap line in time")?;
            match frame {
                None => return Ok(None),
                Some(f) => {
                    if let Ok(data) = f?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Every line until the stream ends.
    async fn all(mut self, timeout: Duration) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        while let Some(v) = self.next(timeout).await? {
            out.push(v);
        }
        Ok(out)
    }
}

/// `GET /tap?query`: the status and the (streaming) body.
async fn tap_request(
    admin: SocketAddr,
    query: &str,
    rcvbuf: Option<u32>,
) -> Result<(u16, Incoming)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    if let Some(n) = rcvbuf {
        sock.set_recv_buffer_size(n)?;
    }
    let io = TokioIo::new(sock.connect(admin).await?);
    let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("/tap?{query}"))
        .header("host", "admin")
        .body(Empty::<Bytes>::new())?;
    let rsp = send.send_request(req).await?;
    Ok((rsp.status().as_u16(), rsp.into_body()))
}

fn server_proxy(ca: &DevCa, sa: &str, app: SocketAddr, env: &[(&str, &str)]) -> Result<Proxy> {
    ca.meshed_proxy(
        NS,
        sa,
        false,
        ProxyOpts {
            inbound_target: Some(app),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        },
    )
}

fn client_proxy(ca: &DevCa, target: &str) -> Result<Proxy> {
    ca.meshed_proxy(
        NS,
        "web",
        true,
        ProxyOpts {
            outbound_target: Some(target.parse()?),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_tap_sees_exactly_the_matching_requests_with_their_fields() -> Result<()> {
    let (app, _) = http_server().await?;
    let ca = DevCa::start("tap-fields", &[])?;
    let server = server_proxy(&ca, "books", app, &[])?;
    ca.manifests.write(
        "route.yaml",
        &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: books, namespace: {NS}}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: books, port: 8080}}]\n  rules:\n\
             \x20   - name: status\n      matches: [{{path: {{type: PathPrefix, value: /status}}}}]\n      backendRefs: [{{name: books, port: 8080}}]\n\
             \x20   - name: rest\n      backendRefs: [{{name: books, port: 8080}}]\n"
        ),
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
    ca.controller.wait_objects("HTTPRoute", 1.0)?;
    let client = client_proxy(&ca, &format!("{CLUSTER_IP}:8080"))?;
    // Warm up discovery and the mTLS connection before tapping.
    let mut conn = Conn::open(client.outbound, false).await?;
    assert_eq!(conn.get(HOST, "/uri").await?.0, 200);

    let out = Tap::open(
        client.admin,
        "authority=books.books.svc.cluster.local&path_prefix=/status/&method=GET&direction=outbound&max=3",
    )
    .await?;
    let errors = Tap::open(client.admin, "status=5xx&max=1").await?;
    let inbound = Tap::open(
        server.admin,
        "direction=inbound&path_prefix=/status/200&max=1",
    )
    .await?;
    assert_eq!(
        client.metrics()?.sum("weft_taps_open", &[]),
        2.0,
        "the hub counts open taps"
    );
    // Not matching the first tap: another path, another method.
    assert_eq!(conn.get(HOST, "/uri").await?.0, 200);
    assert_eq!(conn.post(HOST, "/status/200", Bytes::new()).await?.0, 200);
    // Matching: two 200s and a 503 from the app.
    for path in ["/status/200", "/status/503", "/status/200?x=1"] {
        conn.get(HOST, path).await?;
    }
    let lines = out.all(Duration::from_secs(10)).await?;
    let paths: Vec<_> = lines
        .iter()
        .map(|l| l["path"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        paths,
        ["/status/200", "/status/503", "/status/200?x=1"],
        "{lines:#?}"
    );
    let first = &lines[0];
    assert_eq!(first["direction"], "outbound");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["authority"], HOST);
    assert_eq!(first["status"], 200);
    assert_eq!(first["route"], "httproute/books/books/status");
    assert_eq!(first["endpoint"], server.inbound.to_string());
    assert_eq!(first["server_id"], BOOKS_ID);
    assert_eq!(first["proxy_error"], Value::Null);
    assert_eq!(first["retries"], 0);
    assert!(first["latency_ms"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first["duration_ms"].as_f64().unwrap() >= first["latency_ms"].as_f64().unwrap());
    assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["status"], 503);

    // The 5xx tap saw the app's 503 (not the proxy's: no proxy_error).
    let errors = errors.all(Duration::from_secs(10)).await?;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0]["path"], "/status/503");
    assert_eq!(errors[0]["proxy_error"], Value::Null);

    // Inbound, the server proxy names the verified client.
    let inbound = inbound.all(Duration::from_secs(10)).await?;
    assert_eq!(inbound.len(), 1, "{inbound:#?}");
    assert_eq!(inbound[0]["direction"], "inbound");
    assert_eq!(inbound[0]["client_id"], WEB_ID);
    assert_eq!(inbound[0]["method"], "POST");

    // Every tap ended (max reached): the hub forgot them, so requests are not observed.
    eventually(Duration::from_secs(5), || {
        Ok(client.metrics()?.sum("weft_taps_open", &[]) == 0.0
            && server.metrics()?.sum("weft_taps_open", &[]) == 0.0)
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authority_filter_matches_the_host_with_or_without_port() -> Result<()> {
    let (app, _) = http_server().await?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(app),
        ..Default::default()
    })?;
    let exact = Tap::open(proxy.admin, "authority=books:8080&max=2").await?;
    let host = Tap::open(proxy.admin, "authority=BOOKS&max=2").await?;
    let mut conn = Conn::open(proxy.outbound, false).await?;
    for (authority, path) in [
        ("other:8080", "/a"),
        ("books:8080", "/b"),
        ("books:9090", "/c"),
        ("books:8080", "/d"),
    ] {
        assert_eq!(conn.get(authority, path).await?.0, 200);
    }
    let paths = |lines: Vec<Value>| -> Vec<String> {
        lines
            .iter()
            .map(|l| l["path"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(
        paths(exact.all(Duration::from_secs(10)).await?),
        ["/b", "/d"]
    );
    assert_eq!(
        paths(host.all(Duration::from_secs(10)).await?),
        ["/b", "/c"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_error_shows_in_the_tap() -> Result<()> {
    // Nothing listens on the original destination: the proxy answers 502 connect-refused.
    let closed = free_addr()?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(closed),
        ..Default::default()
    })?;
    let tap = Tap::open(proxy.admin, "status=502&max=1").await?;
    let mut conn = Conn::open(proxy.outbound, false).await?;
    let (status, err, _) = conn.get("nowhere:80", "/a").await?;
    assert_eq!((status, err.as_str()), (502, "connect-refused"));
    let lines = tap.all(Duration::from_secs(10)).await?;
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["proxy_error"], "connect-refused");
    assert_eq!(lines[0]["authority"], "nowhere:80");
    // Where it failed: the original destination.
    assert_eq!(lines[0]["endpoint"], closed.to_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_and_the_seventeenth_tap_are_refused_with_reasons() -> Result<()> {
    let (app, _) = http_server().await?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(app),
        ..Default::default()
    })?;
    for (query, expect) in [
        ("status=6xx", "tap: status=\"6xx\" is not valid"),
        ("direction=up", "tap: direction=\"up\" is not valid"),
        ("colour=red", "tap: unknown query parameter \"colour\""),
    ] {
        let (status, body) = admin_get(proxy.admin, &format!("/tap?{query}"))?;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.starts_with(expect), "{query}: {body}");
    }
    // A duration ends the tap by itself, with no traffic.
    let started = Instant::now();
    let lines = Tap::open(proxy.admin, "duration=300ms")
        .await?
        .all(Duration::from_secs(5))
        .await?;
    assert!(lines.is_empty(), "{lines:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let mut taps = Vec::new();
    for _ in 0..16 {
        taps.push(Tap::open(proxy.admin, "").await?);
    }
    let (status, body) = admin_get(proxy.admin, "/tap")?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many taps: 16 are open"), "{body}");
    // A reader that goes away frees its place.
    drop(taps.pop());
    eventually(Duration::from_secs(5), || {
        Ok(proxy.metrics()?.sum("weft_taps_open", &[]) == 15.0)
    })?;
    taps.push(Tap::open(proxy.admin, "").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_slows_nothing_and_its_drops_are_counted() -> Result<()> {
    let (app, _) = http_server().await?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(app),
        ..Default::default()
    })?;
    let mut conn = Conn::open(proxy.outbound, false).await?;
    batch(&mut conn, 200).await?;
    let baseline = batch(&mut conn, 2000).await?;

    // A tap whose reader never reads: a small receive buffer so the socket fills quickly.
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_recv_buffer_size(4096)?;
    let mut stalled = sock.connect(proxy.admin).await?;
    stalled
        .write_all(b"GET /tap HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await?;
    eventually(Duration::from_secs(5), || {
        Ok(proxy.metrics()?.sum("weft_taps_open", &[]) == 1.0)
    })?;
    // Enough requests to fill the tap's queue (1,000) and the sockets many times over.
    let mut tapped = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tapped += batch(&mut conn, 2000).await?;
        let m = proxy.metrics()?;
        if m.sum("weft_tap_events_total", &[("result", "dropped")]) > 0.0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("no tap event dropped in 60s");
        }
    }
    let m = proxy.metrics()?;
    let sent = m.sum("weft_tap_events_total", &[("result", "sent")]);
    let dropped = m.sum("weft_tap_events_total", &[("result", "dropped")]);
    assert!(sent >= 1000.0, "sent {sent}");
    assert!(dropped > 0.0, "dropped {dropped}");
    // Requests through a proxy with a stalled tap go as fast as without one (per 2,000,
    // with a wide margin for a shared CI machine).
    let rounds = ((sent + dropped) / 2000.0).round().max(1.0);
    let per_batch = tapped.div_f64(rounds);
    assert!(
        per_batch < baseline * 3,
        "2,000 requests took {per_batch:?} with a stalled tap, {baseline:?} without"
    );
    // The reader leaves: the tap closes and requests are no longer observed.
    drop(stalled);
    conn.get("books:8080", "/load").await?;
    eventually(Duration::from_secs(5), || {
        Ok(proxy.metrics()?.sum("weft_taps_open", &[]) == 0.0)
    })?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_told_how_many_events_it_lost() -> Result<()> {
    let (app, _) = http_server().await?;
    let proxy = Proxy::start(ProxyOpts {
        outbound_target: Some(app),
        ..Default::default()
    })?;
    const N: u64 = 10_000;
    let mut tap = Tap::open_with(proxy.admin, "", Some(4096)).await?;
    let mut conn = Conn::open(proxy.outbound, false).await?;
    // The reader is away (not polling) while 10,000 requests finish; the proxy still holds
    // what fits the tap's queue and the socket, and the next line it writes after a gap is a
    // drop report.
    let mut drops = 0;
    let mut events = 0;
    for _ in 0..N {
        conn.get("books:8080", "/x").await?;
    }
    // The reader catches up with what the proxy kept (until a second passes without a
    // line); then one more request: the line before it reports every drop.
    let mut last_sent = false;
    loop {
        let v = match tap.next(Duration::from_secs(1)).await {
            Ok(v) => v.context("tap ended")?,
            Err(_) if !last_sent => {
                conn.get("books:8080", "/last").await?;
                last_sent = true;
                continue;
            }
            Err(e) => return Err(e),
        };
        if let Some(n) = v.get("dropped") {
            drops += n.as_u64().unwrap();
        } else {
            events += 1;
            if v["path"] == "/last" {
                break;
            }
        }
    }
    let m = proxy.metrics()?;
    assert_eq!(
        m.sum("weft_tap_events_total", &[("result", "dropped")]),
        drops as f64
    );
    assert_eq!(events + drops, N + 1, "events {events} dropped {drops}");
    assert!(drops > 0, "nothing dropped: {events} events");
    Ok(())
}

/// `n` GETs on `conn`, all 200: how long they took.
async fn batch(conn: &mut Conn, n: usize) -> Result<Duration> {
    let t = Instant::now();
    for _ in 0..n {
        let (status, _, _) = conn.get("books:8080", "/load").await?;
        anyhow::ensure!(status == 200, "status {status}");
    }
    Ok(t.elapsed())
}

/// This host's address on a non-loopback interface, if it has one.
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.254:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A proxy whose admin port listens on all interfaces; `admin` is its loopback address.
fn proxy_on_all_interfaces(mut opts: ProxyOpts, wait: Duration) -> Result<(Proxy, u16)> {
    let port = free_addr()?.port();
    opts.env
        .push(("WEFT_PROXY_ADMIN_ADDR".into(), format!("0.0.0.0:{port}")));
    let mut p = Proxy::spawn(opts)?;
    p.admin = SocketAddr::from(([127, 0, 0, 1], port));
    p.wait_ready(wait)?;
    Ok((p, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_taps_from_off_the_pod_are_refused_but_metrics_are_not() -> Result<()> {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address: the decision is covered by admin's unit tests");
        return Ok(());
    };
    let (app, _) = http_server().await?;
    let (proxy, port) = proxy_on_all_interfaces(
        ProxyOpts {
            outbound_target: Some(app),
            ..Default::default()
        },
        Duration::from_secs(10),
    )?;
    let outside = SocketAddr::new(ip, port);
    let (status, body) = admin_get(outside, "/tap")?;
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        format!("tap refused: client {ip} is not on loopback, and this proxy has no identity to authorize an mTLS client with\n")
    );
    assert_eq!(admin_get(outside, "/metrics")?.0, 200);
    assert_eq!(admin_get(outside, "/ready")?.0, 200);
    assert_eq!(admin_get(outside, "/live")?.0, 200);
    // Loopback may tap.
    let _tap = Tap::open(proxy.admin, "").await?;
    Ok(())
}

/// `openssl s_client` to the admin port as `leaf`, sending `GET /tap?query`; returns what it
/// printed. Ends when the proxy closes the connection (or after 20 s).
fn tls_tap(
    addr: SocketAddr,
    leaf: &weft_e2e::pki::LeafFiles,
    anchors: &std::path::Path,
    query: &str,
) -> Result<String> {
    let mut child = Command::new("timeout")
        .args([
            "20", "openssl", "s_client", "-quiet", "-tls1_3", "-ign_eof", "-alpn", "http/1.1",
        ])
        .arg("-connect")
        .arg(addr.to_string())
        .arg("-CAfile")
        .arg(anchors)
        .arg("-cert")
        .arg(&leaf.cert)
        .arg("-key")
        .arg(&leaf.key)
        .arg("-cert_chain")
        .arg(&leaf.chain)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running openssl s_client")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    std::io::Write::write_all(
        &mut stdin,
        format!("GET /tap?{query} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    drop(stdin);
    let out = child.wait_with_output()?;
    Ok(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_tap_as_the_controller_is_allowed_and_another_identity_is_refused() -> Result<()> {
    let Some(ip) = non_loopback_ip() else {
        eprintln!("no non-loopback address: the decision is covered by admin's unit tests");
        return Ok(());
    };
    let (app, _) = http_server().await?;
    let ca = DevCa::start("tap-mtls", &[])?;
    let token = ca.token(NS, "books")?;
    let (proxy, port) = proxy_on_all_interfaces(
        ProxyOpts {
            inbound_target: Some(app),
            env: ca.proxy_env(NS, "books", &token),
            ..Default::default()
        },
        Duration::from_secs(15),
    )?;
    let outside = SocketAddr::new(ip, port);
    let dir = ca.ca.path();
    let issuer = Ca::dev_ca_issuer(dir)?;
    let controller = issuer.valid_leaf(dir, "controller", CONTROLLER_ID)?;
    let other = issuer.valid_leaf(dir, "web", WEB_ID)?;

    let refused = tls_tap(outside, &other, &ca.anchors(), "max=1")?;
    assert!(refused.contains("HTTP/1.1 403"), "{refused}");
    assert!(
        refused.contains(&format!(
            "tap refused: client identity {WEB_ID} is not authorized; only {CONTROLLER_ID} may tap"
        )),
        "{refused}"
    );
    // Plaintext from the same address is refused too, naming what to do.
    let (status, body) = admin_get(outside, "/tap")?;
    assert_eq!(status, 403);
    assert!(
        body.contains(&format!("connect with mTLS as {CONTROLLER_ID}")),
        "{body}"
    );

    let (anchors, inbound) = (ca.anchors(), proxy.inbound);
    let allowed = std::thread::spawn(move || {
        tls_tap(outside, &controller, &anchors, "path_prefix=/tapped&max=1")
    });
    eventually(Duration::from_secs(10), || {
        Ok(proxy.metrics()?.sum("weft_taps_open", &[]) == 1.0)
    })?;
    let mut conn = Conn::open(inbound, false).await?;
    assert_eq!(conn.get("books:8080", "/tapped").await?.0, 200);
    let out = allowed
        .join()
        .map_err(|_| anyhow::anyhow!("s_client thread panicked"))??;
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"path\":\"/tapped\""), "{out}");
    assert!(out.contains("\"direction\":\"inbound\""), "{out}");
    Ok(())
}
