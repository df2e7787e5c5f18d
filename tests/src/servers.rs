//! Real servers on loopback for the tests to reach through the proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What an HTTP test server has seen.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Requests whose body ended in an error (client or proxy went away mid-body).
    pub aborted_bodies: AtomicU64,
    /// Milliseconds every request waits before it is answered (0: none); set by a test to
    /// make the server slow for a while.
    pub delay_ms: AtomicU64,
    /// Fault injection: of every 1,000 requests, this many are answered 503 (gRPC: status 14
    /// UNAVAILABLE in a trailers-only answer) instead of being served.
    pub fail_permille: AtomicU64,
    /// Requests answered with an injected failure.
    pub injected: AtomicU64,
    /// Bytes of the `/sink` bodies read whole.
    pub sunk_bytes: AtomicU64,
    /// The `x-tag` header of every request that had one, in arrival order.
    pub tags: std::sync::Mutex<Vec<String>>,
}

impl Stats {
    /// Makes the server fail `fraction` (0..=1) of its requests from now on.
    pub fn fail(&self, fraction: f64) {
        self.fail_permille.store(
            (fraction.clamp(0.0, 1.0) * 1000.0).round() as u64,
            Ordering::Relaxed,
        );
    }
}

/// Whether this request gets an injected failure: exactly `permille` of every 1,000 requests,
/// spread by a counter (not a random draw), so a test's expected share is exact.
fn inject(stats: &Stats, n: u64) -> bool {
    let permille = stats.fail_permille.load(Ordering::Relaxed);
    // Bresenham over the request count: request n fails when the running share steps up.
    permille > 0 && (n * permille) / 1000 != ((n - 1) * permille) / 1000
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// Frames a gRPC message (uncompressed).
pub fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(msg.len() + 5);
    v.push(0);
    v.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    v.extend_from_slice(msg);
    Bytes::from(v)
}

/// Splits a buffer of gRPC frames into messages.
pub fn grpc_messages(mut buf: &[u8]) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        out.push(Bytes::copy_from_slice(&buf[5..5 + len]));
        buf = &buf[5 + len..];
    }
    out
}

async fn route(req: Request<Incoming>, stats: Arc<Stats>) -> Response<Body> {
    let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
    if let Some(tag) = req.headers().get("x-tag") {
        if let Ok(mut tags) = stats.tags.lock() {
            tags.push(String::from_utf8_lossy(tag.as_bytes()).into_owned());
        }
    }
    let delay = stats.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if inject(&stats, n) {
        stats.injected.fetch_add(1, Ordering::Relaxed);
        let rsp = injected_failure(&req);
        // Read the request first, as an application that fails after reading it does: a
        // server that answers before reading a large body and closes races the client's
        // writes (a reset may destroy the answer).
        let _ = req.into_body().collect().await;
        return rsp;
    }
    let query = req.uri().query().unwrap_or("");
    // Per-request faults: `?hang` never answers; `?reset` answers a head and a first chunk,
    // then fails the body, which makes hyper reset the HTTP/2 stream or close the HTTP/1.1
    // connection; `?abort` (in the server's service) closes before any answer.
    if query.split('&').any(|q| q == "hang") {
        std::future::pending::<()>().await;
    }
    if query.split('&').any(|q| q == "reset") {
        // A first chunk (so the head and it leave: hyper sends nothing for a body whose first
        // frame is an error), then the failure.
        let frames = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(
            Bytes::from_static(b"partial"),
        ))])
        .chain(futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<Frame<Bytes>, BoxError>("injected reset".into())
        }));
        return Response::new(BodyExt::boxed(StreamBody::new(frames)));
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    match path.as_str() {
        // Streams the request body back as it arrives (chunked when the length is unknown).
        "/echo" => {
            let body = req.into_body();
            Response::new(body.map_err(BoxError::from).boxed())
        }
        // Reads the whole body, counting bytes, answers the count.
        "/sink" => {
            let mut n = 0u64;
            let mut stream = BodyStream::new(req.into_body());
            while let Some(frame) = stream.next().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            n += d.remaining() as u64;
                        }
                    }
                    Err(_) => {
                        stats.aborted_bodies.fetch_add(1, Ordering::Relaxed);
                        return Response::new(full("aborted"));
                    }
                }
            }
            stats.sunk_bytes.fetch_add(n, Ordering::Relaxed);
            Response::new(full(n.to_string()))
        }
        "/slow" => {
            let ms = query
                .strip_prefix("ms=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(500u64);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Response::new(full("slow done"))
        }
        // The request target as the app received it (origin form for HTTP/1.1).
        "/uri" => Response::new(full(req.uri().to_string())),
        "/headers" => {
            let mut s = String::new();
            for (k, v) in req.headers() {
                s.push_str(&format!(
                    "{}: {}\n",
                    k,
                    String::from_utf8_lossy(v.as_bytes())
                ));
            }
            Response::new(full(s))
        }
        // Body then trailers.
        "/trailers" => {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", HeaderValue::from_static("abc123"));
            let frames = vec![
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"payload"))),
                Ok(Frame::trailers(t)),
            ];
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
        }
        // gRPC echo: each request message comes back, then grpc-status from `?status=N`.
        p if p.starts_with("/weft.test.Echo/") => {
            let status: u32 = query
                .strip_prefix("status=")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
            let mut body = req.into_body();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(Ok(frame)) = body.frame().await {
                    if let Some(d) = frame.data_ref() {
                        buf.extend_from_slice(d);
                        // Echo every complete message as soon as it arrives (streaming).
                        let msgs = grpc_messages(&buf);
                        let consumed: usize = msgs.iter().map(|m| m.len() + 5).sum();
                        buf.drain(..consumed);
                        for m in msgs {
                            if tx.send(Ok(Frame::data(grpc_frame(&m)))).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let mut t = HeaderMap::new();
                t.insert("grpc-status", HeaderValue::from(status));
                if status != 0 {
                    t.insert("grpc-message", HeaderValue::from_static("test%20failure"));
                }
                let _ = tx.send(Ok(Frame::trailers(t))).await;
            });
            let stream = tokio_stream_from(rx);
            let mut rsp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            rsp.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/grpc"));
            rsp
        }
        p if p.starts_with("/status/") => {
            let code = p[8..].parse().unwrap_or(500);
            let mut r = Response::new(full(format!("status {code}")));
            *r.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r
        }
        _ => Response::new(full(format!("hello from {path}"))),
    }
}

/// An injected failure: 503 for HTTP, `grpc-status: 14` (trailers-only) for gRPC.
fn injected_failure(req: &Request<Incoming>) -> Response<Body> {
    let grpc = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    let mut r = Response::new(full("injected failure"));
    if grpc {
        *r.body_mut() = full(Bytes::new());
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("14"));
        r.headers_mut()
            .insert("grpc-message", HeaderValue::from_static("injected"));
    } else {
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    }
    r
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Starts an HTTP/1.1 + HTTP/2 (prior knowledge) server on a free loopback port.
pub async fn http_server() -> Result<(SocketAddr, Arc<Stats>)> {
    let (addr, stats, stop) = killable_http_server(false).await?;
    // Never killed: the server lives as long as the test's runtime.
    std::mem::forget(stop);
    Ok((addr, stats))
}

/// Stops a [`killable_http_server`] the way a killed process stops: its listener closes and
/// every connection is dropped at once, whatever it was doing.
#[derive(Debug)]
pub struct Kill(tokio::sync::watch::Sender<bool>);

impl Kill {
    pub fn kill(&self) {
        let _ = self.0.send(true);
    }
}

/// Like [`http_server`], with a handle that kills it; `h1_only`: it speaks only HTTP/1.1, as
/// many applications do (a request in HTTP/2 form gets a 400, as from nginx).
pub async fn killable_http_server(h1_only: bool) -> Result<(SocketAddr, Arc<Stats>, Kill)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let stats = Arc::new(Stats::default());
    let st = stats.clone();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let killed = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|k| *k).await;
    };
    tokio::spawn(async move {
        loop {
            let s = tokio::select! {
                _ = killed(rx.clone()) => return,
                r = l.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => return,
                },
            };
            st.connections.fetch_add(1, Ordering::Relaxed);
            let st = st.clone();
            let rx = rx.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let st = st.clone();
                    async move {
                        // `?abort`: no answer at all; the service's error makes hyper close
                        // the HTTP/1.1 connection (or reset the HTTP/2 stream) before any
                        // response byte, as a crashing application does.
                        let query = req.uri().query().unwrap_or("");
                        if query.split('&').any(|q| q == "abort") {
                            st.requests.fetch_add(1, Ordering::Relaxed);
                            return Err(std::io::Error::other("injected abort"));
                        }
                        Ok::<_, std::io::Error>(route(req, st).await)
                    }
                });
                let io = TokioIo::new(s);
                let conn: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
                    if h1_only {
                        // hyper-util's `auto::Builder::http1_only` does nothing with upgrades.
                        let c = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades();
                        Box::pin(async move {
                            let _ = c.await;
                        })
                    } else {
                        Box::pin(async move {
                            let _ =
                                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                                    .serve_connection_with_upgrades(io, svc)
                                    .await;
                        })
                    };
                tokio::select! {
                    _ = conn => {}
                    _ = killed(rx) => {}
                }
            });
        }
    });
    Ok((addr, stats, Kill(tx)))
}

/// A TCP server that reads until EOF, then writes back `reply: <bytes received>` and closes.
pub async fn tcp_half_close_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                if s.read_to_end(&mut got).await.is_ok() {
                    let mut reply = b"reply: ".to_vec();
                    reply.extend_from_slice(&got);
                    let _ = s.write_all(&reply).await;
                }
            });
        }
    });
    Ok(addr)
}

/// A server-speaks-first TCP server (like SMTP or MySQL): writes a banner on accept.
pub async fn banner_server(banner: &'static [u8]) -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(banner).await;
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink).await;
            });
        }
    });
    Ok(addr)
}

/// A TCP server that resets every connection after reading a first chunk.
pub async fn reset_server() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
                let _ = socket_reset(&s);
            });
        }
    });
    Ok(addr)
}

fn socket_reset(s: &tokio::net::TcpStream) -> std::io::Result<()> {
    s.set_zero_linger()
}
