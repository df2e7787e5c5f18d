//! Loopback tier: real `weft-proxy` processes with fixed targets, real servers, real clients.
//! Covers HTTP/1.1 (keep-alive pooling, chunked, pipelining, 100-continue, upgrades), HTTP/2
//! (multiplexing, trailers), gRPC (unary, streaming, status), and streaming large bodies.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use weft_e2e::servers::{grpc_frame, grpc_messages, http_server};
use weft_e2e::{Proxy, ProxyOpts};

fn one_hop(target: std::net::SocketAddr) -> Proxy {
    Proxy::start(ProxyOpts {
        outbound_target: Some(target),
        ..Default::default()
    })
    .expect("proxy starts")
}

/// Client sidecar → server sidecar → app, as between two meshed pods.
fn two_hops(app: std::net::SocketAddr) -> (Proxy, Proxy) {
    let server_side = Proxy::start(ProxyOpts {
        inbound_target: Some(app),
        ..Default::default()
    })
    .expect("server proxy starts");
    let client_side = Proxy::start(ProxyOpts {
        outbound_target: Some(server_side.inbound),
        ..Default::default()
    })
    .expect("client proxy starts");
    (client_side, server_side)
}

async fn h1_conn(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    send
}

fn body(b: &'static str) -> http_body_util::combinators::BoxBody<Bytes, std::io::Error> {
    Full::new(Bytes::from_static(b.as_bytes()))
        .map_err(|e| match e {})
        .boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keepalive_reuses_pooled_upstream_connections_and_streams_chunked_bodies() {
    let (app, stats) = http_server().await.unwrap();
    let (client_proxy, server_proxy) = two_hops(app);
    let mut send = h1_conn(client_proxy.outbound).await;
    for i in 0..20 {
        let req = Request::post("/echo")
            .header("host", "books.demo:80")
            .body(body("ping"))
            .unwrap();
        send.ready().await.unwrap();
        let rsp = send.send_request(req).await.unwrap();
        assert_eq!(rsp.status(), 200, "request {i}");
        let b = rsp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&b[..], b"ping");
    }
    // The app sees the origin form, as from a client without proxies, and the client's Host.
    let req = Request::get("/uri?x=1&y=%20")
        .header("host", "books.demo:80")
        .body(body(""))
        .unwrap();
    send.ready().await.unwrap();
    let rsp = send.send_request(req).await.unwrap();
    let b = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&b[..], b"/uri?x=1&y=%20");

    // Chunked request body (no content-length), streamed back chunked.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..50)
        .map(|i| Ok(Frame::data(Bytes::from(format!("chunk-{i};")))))
        .collect();
    let req = Request::post("/echo")
        .header("host", "books.demo:80")
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            chunks,
        ))))
        .unwrap();
    send.ready().await.unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(
        rsp.headers().get("transfer-encoding").map(|v| v.as_bytes()),
        Some(&b"chunked"[..])
    );
    let b = rsp.into_body().collect().await.unwrap().to_bytes();
    let want: String = (0..50).map(|i| format!("chunk-{i};")).collect();
    assert_eq!(b, want.as_bytes());

    // 22 requests over one client connection reached the app over one pooled connection.
    assert_eq!(stats.requests.load(Ordering::Relaxed), 22);
    assert_eq!(stats.connections.load(Ordering::Relaxed), 1);
    let m = client_proxy.metrics().unwrap();
    assert_eq!(
        m.sum(
            "weft_http_requests_total",
            &[("direction", "outbound"), ("authority", "books.demo:80")]
        ),
        22.0
    );
    let m = server_proxy.metrics().unwrap();
    assert_eq!(
        m.sum(
            "weft_http_responses_total",
            &[
                ("direction", "inbound"),
                ("status_code", "200"),
                ("classification", "success")
            ]
        ),
        22.0
    );
    assert!(
        m.sum(
            "weft_http_response_duration_seconds_count",
            &[("direction", "inbound")]
        ) >= 22.0
    );
}

async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &[u8], count: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while buf.windows(needle.len()).filter(|w| *w == needle).count() < count {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("response in time")
            .unwrap();
        assert!(
            n > 0,
            "closed early; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_pipelined_requests_are_answered_in_order() {
    let (app, _) = http_server().await.unwrap();
    let proxy = one_hop(app);
    let mut s = TcpStream::connect(proxy.outbound).await.unwrap();
    s.write_all(
        b"GET /slow?ms=150 HTTP/1.1\r\nHost: a\r\n\r\nGET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"HTTP/1.1 200", 3).await;
    read_until(&mut s, &mut buf, b"hello from /second", 1).await;
    let text = String::from_utf8_lossy(&buf);
    let a = text.find("slow done").unwrap();
    let b = text.find("hello from /first").unwrap();
    let c = text.find("hello from /second").unwrap();
    assert!(a < b && b < c, "out of order: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_expect_100_continue_is_answered_before_the_body() {
    let (app, _) = http_server().await.unwrap();
    let proxy = one_hop(app);
    let mut s = TcpStream::connect(proxy.outbound).await.unwrap();
    s.write_all(
        b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"100 Continue", 1).await;
    s.write_all(b"hello").await.unwrap();
    read_until(&mut s, &mut buf, b"\r\n\r\n5", 1).await;
    assert!(String::from_utf8_lossy(&buf).contains("HTTP/1.1 200 OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_works_end_to_end_through_two_hops() {
    // A real WebSocket server (tungstenite) behind two proxies.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        ws.send(msg).await.unwrap();
                    }
                }
            });
        }
    });
    let (client_proxy, _server_proxy) = two_hops(app);
    let url = format!("ws://{}/chat", client_proxy.outbound);
    let (mut ws, rsp) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(rsp.status(), 101);
    for i in 0..10 {
        let text = format!("message {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(text.clone()))
            .await
            .unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

async fn h2_conn(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<
    http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
> {
    let s = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_are_multiplexed_and_trailers_pass() {
    let (app, stats) = http_server().await.unwrap();
    let (client_proxy, _server_proxy) = two_hops(app);
    let send = h2_conn(client_proxy.outbound).await;
    // 64 concurrent slow requests on one connection finish in about one request's time.
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let mut send = send.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://books.demo/slow?ms=300")
                .body(body(""))
                .unwrap();
            send.ready().await.unwrap();
            let rsp = send.send_request(req).await.unwrap();
            assert_eq!(rsp.status(), 200);
            rsp.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for t in tasks {
        assert_eq!(&t.await.unwrap()[..], b"slow done");
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "not multiplexed: {:?}",
        start.elapsed()
    );
    // The app saw them over a single HTTP/2 connection.
    assert_eq!(stats.connections.load(Ordering::Relaxed), 1);

    let mut s2 = send.clone();
    let rsp = s2
        .send_request(
            Request::get("http://books.demo/trailers")
                .body(body(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let collected = rsp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers forwarded");
    assert_eq!(trailers["x-checksum"], "abc123");
    assert_eq!(&collected.to_bytes()[..], b"payload");
}

async fn grpc_call(
    send: &mut hyper::client::conn::http2::SendRequest<
        http_body_util::combinators::BoxBody<Bytes, std::io::Error>,
    >,
    path: &str,
    msgs: &[&str],
) -> (Vec<Bytes>, http::HeaderMap) {
    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = msgs
        .iter()
        .map(|m| Ok(Frame::data(grpc_frame(m.as_bytes()))))
        .collect();
    let req = Request::post(format!("http://echo.demo{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))
        .unwrap();
    send.ready().await.unwrap();
    let rsp = send.send_request(req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["content-type"], "application/grpc");
    let c = rsp.into_body().collect().await.unwrap();
    let trailers = c.trailers().cloned().expect("grpc trailers");
    (grpc_messages(&c.to_bytes()), trailers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_keep_status_and_trailers() {
    let (app, _) = http_server().await.unwrap();
    let (client_proxy, server_proxy) = two_hops(app);
    let mut send = h2_conn(client_proxy.outbound).await;

    let (msgs, trailers) = grpc_call(&mut send, "/weft.test.Echo/Unary", &["hello"]).await;
    assert_eq!(msgs, vec![Bytes::from_static(b"hello")]);
    assert_eq!(trailers["grpc-status"], "0");

    let many: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    let (msgs, trailers) = grpc_call(&mut send, "/weft.test.Echo/Stream", &refs).await;
    assert_eq!(msgs.len(), 100);
    assert_eq!(&msgs[99][..], b"m99");
    assert_eq!(trailers["grpc-status"], "0");

    let (_, trailers) = grpc_call(&mut send, "/weft.test.Echo/Unary?status=14", &["x"]).await;
    assert_eq!(trailers["grpc-status"], "14");
    assert_eq!(trailers["grpc-message"], "test%20failure");

    // A gRPC error is a failure in golden metrics even though HTTP said 200.
    weft_e2e::eventually(Duration::from_secs(5), || {
        let m = server_proxy.metrics()?;
        Ok(m.sum(
            "weft_http_responses_total",
            &[
                ("direction", "inbound"),
                ("grpc_status", "14"),
                ("classification", "failure"),
            ],
        ) == 1.0
            && m.sum(
                "weft_http_responses_total",
                &[
                    ("direction", "inbound"),
                    ("grpc_status", "0"),
                    ("classification", "success"),
                ],
            ) == 2.0)
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_with_flat_proxy_memory() {
    let (app, _) = http_server().await.unwrap();
    let proxy = one_hop(app);
    let idle_rss = proxy.rss_bytes().unwrap();
    const CHUNK: usize = 256 * 1024;
    const TOTAL: u64 = 1 << 30;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let frames = futures_util::stream::iter(
        (0..(TOTAL as usize / CHUNK))
            .map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let mut send = h1_conn(proxy.outbound).await;
    let req = Request::post("/sink")
        .header("host", "upload.demo")
        .header("content-length", TOTAL.to_string())
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap();
    let pid_rss = {
        let pid = proxy.pid();
        move || -> u64 {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("VmRSS:"))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .unwrap_or(0)
                * 1024
        }
    };
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = tokio::spawn({
        let done = done.clone();
        async move {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(pid_rss());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        }
    });
    send.ready().await.unwrap();
    let rsp = send.send_request(req).await.unwrap();
    let got = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, TOTAL.to_string().as_bytes());
    done.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap().max(proxy.rss_bytes().unwrap());
    // Memory must not grow with the body: 1 GiB went through, RSS stays within a few MiB.
    assert!(
        peak < idle_rss + 16 * 1024 * 1024,
        "idle {idle_rss} → {peak} bytes after 1 GiB"
    );
}
