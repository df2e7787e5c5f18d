//! Clients for the loopback tests: one HTTP connection to a proxy ([`Conn`]), a steady
//! request load that records every failure ([`Load`]), and a TCP echo server and client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

use crate::servers::{grpc_frame, grpc_messages};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// One HTTP connection to the proxy's outbound port.
pub enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// What a [`Load`] speaks to the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 GETs.
    H1,
    /// HTTP/2 GETs.
    H2,
    /// Unary gRPC calls (POST with a message, status in the trailers) over HTTP/2.
    Grpc,
}

impl Conn {
    pub async fn open(proxy: SocketAddr, h2: bool) -> Result<Self> {
        let io = TokioIo::new(TcpStream::connect(proxy).await?);
        Ok(if h2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            Conn::H1(send)
        })
    }

    /// GET `path` with authority `host`: (status, proxy error header, body).
    pub async fn get(&mut self, host: &str, path: &str) -> Result<(u16, String, Bytes)> {
        self.get_with(host, path, &[]).await
    }

    /// [`Conn::get`] with extra request headers.
    pub async fn get_with(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String, Bytes)> {
        let (status, err, _, body) = self.send_get(host, path, headers).await?;
        Ok((status, err, body))
    }

    /// [`Conn::get`], returning the response header `name` instead of the body.
    pub async fn get_header(
        &mut self,
        host: &str,
        path: &str,
        name: &str,
    ) -> Result<(u16, String, Option<String>)> {
        let (status, err, head, _) = self.send_get(host, path, &[]).await?;
        let v = head
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        Ok((status, err, v))
    }

    /// [`Conn::get_with`], with the whole response head: (status, proxy error header, head,
    /// body).
    pub async fn get_full(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String, http::HeaderMap, Bytes)> {
        self.send_get(host, path, headers).await
    }

    /// POST `body` to `path`: (status, proxy error header, response body).
    pub async fn post(
        &mut self,
        host: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, String, Bytes)> {
        let (status, err, _, body) = self.send(http::Method::POST, host, path, &[], body).await?;
        Ok((status, err, body))
    }

    async fn send_get(
        &mut self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String, http::HeaderMap, Bytes)> {
        self.send(http::Method::GET, host, path, headers, Bytes::new())
            .await
    }

    async fn send(
        &mut self,
        method: http::Method,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(u16, String, http::HeaderMap, Bytes)> {
        let mut b = match self {
            Conn::H1(_) => Request::builder().uri(path).header("host", host),
            Conn::H2(_) => Request::builder().uri(format!("http://{host}{path}")),
        }
        .method(method);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body))?;
        let rsp = match self {
            Conn::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Conn::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = rsp.status().as_u16();
        let err = rsp
            .headers()
            .get("weft-proxy-error")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let head = rsp.headers().clone();
        let body = rsp.into_body().collect().await?.to_bytes();
        Ok((status, err, head, body))
    }

    /// A unary call to the test servers' gRPC echo (HTTP/2 only): Ok when the message came
    /// back with `grpc-status: 0`, else a description of what came back.
    pub async fn grpc_echo(
        &mut self,
        host: &str,
        msg: &[u8],
    ) -> Result<std::result::Result<(), String>> {
        self.grpc_echo_path(host, "/weft.test.Echo/Call", msg).await
    }

    /// [`Conn::grpc_echo`] on another path (e.g. `…/Call?status=14`, an echo that ends with
    /// that status in its trailers).
    pub async fn grpc_echo_path(
        &mut self,
        host: &str,
        path: &str,
        msg: &[u8],
    ) -> Result<std::result::Result<(), String>> {
        let Conn::H2(s) = self else {
            bail!("gRPC needs an HTTP/2 connection");
        };
        s.ready().await?;
        let req = Request::post(format!("http://{host}{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(grpc_frame(msg)))?;
        let rsp = s.send_request(req).await?;
        let status = rsp.status().as_u16();
        let err = rsp
            .headers()
            .get("weft-proxy-error")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        // A trailers-only answer (a proxy-made error) carries its status in the head.
        let head = rsp.headers().clone();
        let body = rsp.into_body().collect().await?;
        let field = |name: &str| {
            body.trailers()
                .and_then(|t| t.get(name))
                .or_else(|| head.get(name))
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let grpc = field("grpc-status");
        let message = field("grpc-message");
        let bytes = body.to_bytes();
        let echoed = grpc_messages(&bytes);
        if status == 200
            && grpc.as_deref() == Some("0")
            && echoed.first().map(|m| &m[..]) == Some(msg)
        {
            Ok(Ok(()))
        } else {
            Ok(Err(format!(
                "{status} weft-proxy-error={err:?} grpc-status={grpc:?} grpc-message={message:?} body={:?}",
                String::from_utf8_lossy(&bytes)
            )))
        }
    }
}

/// A request of a [`Load`] that failed.
#[derive(Debug, Clone)]
pub struct Failed {
    /// When it was sent.
    pub sent: Instant,
    /// The status and proxy error, or the client error.
    pub error: String,
}

/// Steady open-loop-ish load: `conns` connections each sending a GET every `conns/rps`
/// seconds; every non-200 or error is a failure.
pub struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<Failed>>>,
    stop: tokio_util_stop::Stop,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

mod tokio_util_stop {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    pub struct Stop(Arc<AtomicBool>);
    impl Stop {
        pub fn stop(&self) {
            self.0.store(true, Ordering::Relaxed)
        }
        pub fn stopped(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}

impl Load {
    pub async fn start(
        proxy: SocketAddr,
        host: &str,
        h2: bool,
        rps: u32,
        conns: u32,
    ) -> Result<Self> {
        let proto = if h2 { Proto::H2 } else { Proto::H1 };
        Self::start_with(proxy, host, proto, rps, conns).await
    }

    /// [`Load::start`] speaking `proto`.
    pub async fn start_with(
        proxy: SocketAddr,
        host: &str,
        proto: Proto,
        rps: u32,
        conns: u32,
    ) -> Result<Self> {
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = tokio_util_stop::Stop::default();
        let period = Duration::from_secs_f64(f64::from(conns) / f64::from(rps));
        let mut tasks = Vec::new();
        for i in 0..conns {
            let mut conn = Conn::open(proxy, proto != Proto::H1).await?;
            let (ok, failed, errors, stop) =
                (ok.clone(), failed.clone(), errors.clone(), stop.clone());
            let host = host.to_string();
            tasks.push(tokio::spawn(async move {
                // Spread the connections' ticks over the period.
                let start = Instant::now() + period.mul_f64(f64::from(i) / f64::from(conns));
                let mut tick = tokio::time::interval_at(start, period);
                while !stop.stopped() {
                    tick.tick().await;
                    let sent = Instant::now();
                    let outcome = match proto {
                        Proto::Grpc => conn.grpc_echo(&host, b"load").await,
                        Proto::H1 | Proto::H2 => conn.get(&host, "/load").await.map(|r| match r {
                            (200, _, _) => Ok(()),
                            (s, e, b) => Err(format!("{s} {e} {}", String::from_utf8_lossy(&b))),
                        }),
                    };
                    match outcome {
                        Ok(Ok(())) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            lock(&errors).push(Failed { sent, error: e });
                        }
                        Err(e) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            lock(&errors).push(Failed {
                                sent,
                                error: format!("{e:#}"),
                            });
                            return;
                        }
                    }
                }
            }));
        }
        Ok(Self {
            ok,
            failed,
            errors,
            stop,
            tasks,
        })
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the load: the requests that succeeded and every failure.
    pub async fn stop(self) -> Result<(u64, Vec<Failed>)> {
        self.stop.stop();
        for t in self.tasks {
            t.await?;
        }
        let failures = std::mem::take(&mut *lock(&self.errors));
        Ok((self.ok.load(Ordering::Relaxed), failures))
    }

    pub async fn finish(self) -> Result<u64> {
        self.stop.stop();
        for t in self.tasks {
            t.await?;
        }
        let failed = self.failed.load(Ordering::Relaxed);
        if failed > 0 {
            bail!(
                "{failed} requests failed (of {}): {:?}",
                failed + self.ok.load(Ordering::Relaxed),
                &lock(&self.errors)[..]
            );
        }
        Ok(self.ok.load(Ordering::Relaxed))
    }
}

/// A TCP echo server counting accepted connections.
pub async fn echo_server() -> Result<(SocketAddr, Arc<AtomicU64>)> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    Ok((addr, accepted))
}

pub async fn echo(proxy: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    s.write_all(b"hello weft\n").await?;
    let mut buf = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf))
        .await
        .context("echo timed out")??;
    if &buf != b"hello weft\n" {
        bail!("echo answered {:?}", String::from_utf8_lossy(&buf));
    }
    Ok(s)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
