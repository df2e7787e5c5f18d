//! Loopback tier: opaque TCP, detection edge cases, bad input, leak checks, configuration
//! errors and graceful shutdown — against real `weft-proxy` processes.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::servers::{banner_server, http_server, reset_server, tcp_half_close_server};
use weft_e2e::{eventually, Proxy, ProxyOpts};

fn proxy_to(target: SocketAddr, env: &[(&str, &str)]) -> Proxy {
    Proxy::start(ProxyOpts {
        outbound_target: Some(target),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .expect("proxy starts")
}

/// Sends raw bytes and reads the whole reply until the proxy closes (std, blocking).
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_half_close_reaches_server_and_reply_arrives() {
    let server = tcp_half_close_server().await.unwrap();
    let proxy = proxy_to(server, &[("WEFT_PROXY_DETECT_TIMEOUT", "300ms")]);
    let mut c = TcpStream::connect(proxy.outbound).await.unwrap();
    c.write_all(b"\x00\x01binary payload").await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, b"reply: \x00\x01binary payload");
    let m = proxy.metrics().unwrap();
    assert_eq!(m.sum("weft_detect_total", &[("protocol", "opaque")]), 1.0);
    assert!(m.sum("weft_tcp_read_bytes_total", &[("direction", "outbound")]) >= 16.0);
    assert!(m.sum("weft_tcp_write_bytes_total", &[("direction", "outbound")]) >= 23.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_reset_is_propagated_to_the_client() {
    let server = reset_server().await.unwrap();
    let proxy = proxy_to(server, &[]);
    let mut c = TcpStream::connect(proxy.outbound).await.unwrap();
    c.write_all(b"\x05\x06opaque").await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_speaks_first_protocols_do_not_stall_on_opaque_ports() {
    let server = banner_server(b"220 smtp.demo ESMTP ready\r\n")
        .await
        .unwrap();
    // Detection would wait 10 s for the client to speak; the opaque port skips it.
    let port = server.port().to_string();
    let proxy = proxy_to(
        server,
        &[
            ("WEFT_PROXY_OPAQUE_PORTS", &port),
            ("WEFT_PROXY_DETECT_TIMEOUT", "10s"),
        ],
    );
    let start = Instant::now();
    let mut c = TcpStream::connect(proxy.outbound).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut buf))
        .await
        .expect("banner without waiting")
        .unwrap();
    assert!(buf[..n].starts_with(b"220 "), "{:?}", &buf[..n]);
    assert!(start.elapsed() < Duration::from_secs(2));
    assert_eq!(
        proxy
            .metrics()
            .unwrap()
            .sum("weft_detect_total", &[("protocol", "skipped")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_fall_back_to_opaque_after_the_detect_timeout() {
    let server = banner_server(b"* OK imap ready\r\n").await.unwrap();
    let proxy = proxy_to(server, &[("WEFT_PROXY_DETECT_TIMEOUT", "300ms")]);
    let start = Instant::now();
    let mut c = TcpStream::connect(proxy.outbound).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(buf[..n].starts_with(b"* OK"));
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert_eq!(
        proxy
            .metrics()
            .unwrap()
            .sum("weft_detect_total", &[("protocol", "timeout")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_input_gets_clear_errors_and_leaks_nothing() {
    let (app, stats) = http_server().await.unwrap();
    let proxy = proxy_to(
        app,
        &[
            ("WEFT_PROXY_HEADER_READ_TIMEOUT", "500ms"),
            ("WEFT_PROXY_DETECT_TIMEOUT", "500ms"),
        ],
    );
    // Warm up (pools, lazily created metrics), then take the baseline.
    assert!(raw_exchange(
        proxy.outbound,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .contains("200 OK"));
    let fds_before = proxy.open_fds().unwrap();
    let tasks = |p: &Proxy| p.metrics().map(|m| m.sum("weft_runtime_alive_tasks", &[]));
    let tasks_before = tasks(&proxy).unwrap();
    assert!(
        tasks_before >= 1.0,
        "weft_runtime_alive_tasks must be exported"
    );

    let outbound = proxy.outbound;
    tokio::task::spawn_blocking(move || {
        for _ in 0..3 {
            // Oversized header: 431.
            let big = format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
                "a".repeat(70_000)
            );
            let r = raw_exchange(outbound, big.as_bytes());
            assert!(r.starts_with("HTTP/1.1 431"), "{r}");
            assert!(r.contains("weft-proxy-error: header-too-large"));
            // The same as the second request of a keep-alive connection: still the proxy's 431.
            let two = format!(
                "GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
                "a".repeat(70_000)
            );
            let r = raw_exchange(outbound, two.as_bytes());
            assert!(r.starts_with("HTTP/1.1 200"), "{r}");
            let second = r
                .find("HTTP/1.1 431")
                .unwrap_or_else(|| panic!("no 431 in {r}"));
            assert!(
                r[second..].contains("weft-proxy-error: header-too-large"),
                "{r}"
            );
            // Malformed header line: 400.
            let r = raw_exchange(outbound, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n");
            assert!(r.starts_with("HTTP/1.1 400"), "{r}");
            assert!(r.contains("weft-proxy-error: bad-request"));
            // Invalid Host: 400 from the request path.
            let r = raw_exchange(
                outbound,
                b"GET / HTTP/1.1\r\nHost: bad host\r\nConnection: close\r\n\r\n",
            );
            assert!(r.starts_with("HTTP/1.1 400"), "{r}");
            assert!(r.contains("weft-proxy-error: bad-authority"));
            // Headers trickling in too slowly: 408 after the header read timeout.
            let mut s = std::net::TcpStream::connect(outbound).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n").unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            assert!(out.starts_with("HTTP/1.1 408"), "{out}");
            assert!(out.contains("weft-proxy-error: header-timeout"));
            // Garbage bytes: not HTTP, relayed as opaque; the app rejects them, nothing panics.
            let _ = raw_exchange(outbound, b"\x00\xff\x13garbage\r\n\r\n");
            // Client vanishes mid-body.
            let mut s = std::net::TcpStream::connect(outbound).unwrap();
            s.write_all(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\npartial")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            drop(s);
            // Connect and leave without a byte.
            drop(std::net::TcpStream::connect(outbound).unwrap());
        }
    })
    .await
    .unwrap();

    // The proxy still serves, and every connection's fd and task are gone again.
    assert!(raw_exchange(
        proxy.outbound,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .contains("200 OK"));
    eventually(Duration::from_secs(5), || {
        Ok(proxy.open_fds()? <= fds_before && tasks(&proxy)? <= tasks_before)
    })
    .unwrap_or_else(|e| {
        panic!(
            "leak: fds {} → {}, tasks {} → {}: {e}",
            fds_before,
            proxy.open_fds().unwrap(),
            tasks_before,
            tasks(&proxy).unwrap()
        )
    });
    eventually(Duration::from_secs(5), || {
        Ok(stats
            .aborted_bodies
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3)
    })
    .unwrap();
    let m = proxy.metrics().unwrap();
    // Three rounds; header-too-large twice a round (first and keep-alive request).
    for (cause, n) in [
        ("header-too-large", 6.0),
        ("bad-request", 3.0),
        ("bad-authority", 3.0),
        ("header-timeout", 3.0),
    ] {
        assert_eq!(
            m.sum("weft_proxy_errors_total", &[("cause", cause)]),
            n,
            "{cause}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_destinations_get_502_for_http_and_reset_for_tcp() {
    let dead = weft_e2e::free_addr().unwrap(); // nothing listens here
    let proxy = proxy_to(dead, &[("WEFT_PROXY_DETECT_TIMEOUT", "200ms")]);
    let r = raw_exchange(proxy.outbound, b"GET / HTTP/1.1\r\nHost: gone.demo\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 502"), "{r}");
    assert!(r.contains("weft-proxy-error: connect-refused"), "{r}");

    let mut c = TcpStream::connect(proxy.outbound).await.unwrap();
    c.write_all(b"\x01opaque").await.unwrap();
    let mut buf = [0u8; 8];
    let res = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf))
        .await
        .unwrap();
    assert_eq!(res.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);

    let m = proxy.metrics().unwrap();
    assert_eq!(
        m.sum("weft_proxy_errors_total", &[("cause", "connect-refused")]),
        2.0
    );
    assert_eq!(
        m.sum(
            "weft_http_responses_total",
            &[("status_code", "502"), ("classification", "failure")]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_admin_endpoints_behave() {
    let (app, _) = http_server().await.unwrap();
    let proxy = proxy_to(app, &[]);
    assert!(raw_exchange(
        proxy.outbound,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    .contains("200 OK"));
    let (status, text) = weft_e2e::admin_get(proxy.admin, "/metrics").unwrap();
    assert_eq!(status, 200);
    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "promtool check metrics failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "promtool missing in CI: {e}"
            );
            eprintln!("promtool not installed; run scripts/setup.sh");
        }
    }
    for name in [
        "weft_http_requests_total",
        "weft_http_responses_total",
        "weft_http_response_duration_seconds_bucket",
        "weft_tcp_connections_open",
        "weft_tcp_connections_total",
        "weft_detect_total",
        "process_resident_memory_bytes",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert_eq!(weft_e2e::admin_get(proxy.admin, "/live").unwrap().0, 200);
    assert_eq!(weft_e2e::admin_get(proxy.admin, "/nope").unwrap().0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let (app, _) = http_server().await.unwrap();
    let mut proxy = proxy_to(app, &[("WEFT_PROXY_SHUTDOWN_GRACE_PERIOD", "10s")]);
    let outbound = proxy.outbound;
    let in_flight = tokio::task::spawn_blocking(move || {
        raw_exchange(outbound, b"GET /slow?ms=1000 HTTP/1.1\r\nHost: a\r\n\r\n")
    });
    // Wait until the request is in flight at the proxy.
    eventually(Duration::from_secs(5), || {
        Ok(proxy.metrics()?.sum("weft_http_requests_total", &[]) >= 1.0)
    })
    .unwrap();
    proxy.terminate();
    // New connections are refused once draining starts.
    eventually(Duration::from_secs(5), || {
        Ok(std::net::TcpStream::connect(outbound).is_err())
    })
    .unwrap();
    let reply = in_flight.await.unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("slow done"));
    let status = proxy.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "exit status {status}");
}

#[test]
fn invalid_configuration_exits_before_binding_and_names_the_variable() {
    let admin = weft_e2e::free_addr().unwrap();
    for (var, value) in [
        ("WEFT_PROXY_OUTBOUND_ADDR", "localhost:4140"),
        ("WEFT_PROXY_DETECT_TIMEOUT", "ten"),
        ("WEFT_PROXY_OPAQUE_PORTS", "25,70000"),
        ("WEFT_PROXY_LOG", "weft=loud"),
    ] {
        let out = std::process::Command::new(weft_e2e::bin("weft-proxy").unwrap())
            .env("WEFT_PROXY_ADMIN_ADDR", admin.to_string())
            .env(var, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var) && err.contains(value), "{var}: {err}");
        // Nothing was bound.
        std::net::TcpListener::bind(admin).expect("admin port still free");
    }
}
