//! The bench server: HTTP/1.1 and HTTP/2 (prior knowledge) on one port via
//! hyper-util's auto server. Any request gets `200` with a fixed body of
//! `response_size` bytes once its own body is read; a gRPC request to
//! [`grpc::UNARY_PATH`] gets its message echoed and `grpc-status: 0`.
//!
//! The runner starts it as a child process (`weft-bench server`) so that it
//! can be pinned to the proxies' CPU; the smoke test runs it in-process, and
//! `balance` and the traffic-policy benchmarks ([`crate::policy`]) run several
//! on one pinned thread ([`spawn_thread`]) so that their counters are plain atomics.
//!
//! **Fault injection** ([`Fault`]): a server can answer a deterministic share of its
//! requests with `503` (every n-th request by arrival, so a 20 % failure rate is exactly
//! every 5th request and a run is repeatable), or every request (a hard-failing endpoint);
//! the share can change while it serves.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::grpc;

/// A response body: the bytes, then trailers for gRPC.
pub type ResponseBody = WithTrailers<Full<Bytes>, Ready<Option<Result<HeaderMap, Infallible>>>>;

fn body(bytes: Bytes, trailers: Option<HeaderMap>) -> ResponseBody {
    Full::new(bytes).with_trailers(ready(trailers.map(Ok)))
}

/// Answers one request. Pure apart from reading the request body.
pub async fn handle(
    req: Request<Incoming>,
    payload: Bytes,
) -> Result<Response<ResponseBody>, hyper::Error> {
    let is_grpc = req.uri().path() == grpc::UNARY_PATH
        && req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(grpc::CONTENT_TYPE));
    let request_body = req.into_body().collect().await?.to_bytes();
    if !is_grpc {
        let mut response = Response::new(body(payload, None));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return Ok(response);
    }
    let mut trailers = HeaderMap::new();
    let reply = match grpc::decode_single(&request_body) {
        Ok(message) => {
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            grpc::encode(message)
        }
        Err(e) => {
            // INVALID_ARGUMENT, with the reason.
            trailers.insert("grpc-status", HeaderValue::from_static("3"));
            if let Ok(v) = HeaderValue::from_str(&e.to_string()) {
                trailers.insert("grpc-message", v);
            }
            Bytes::new()
        }
    };
    let mut response = Response::new(body(reply, Some(trailers)));
    *response.status_mut() = StatusCode::OK;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(grpc::CONTENT_TYPE));
    Ok(response)
}

/// Whether request number `n` (0-based, in arrival order) fails when every `every`-th
/// request does: the `every`-th, `2·every`-th, … (0: none; 1: all). Pure.
pub fn fails(every: u64, n: u64) -> bool {
    every != 0 && n % every == every - 1
}

/// Injected failures of one server: which requests are answered `503 Service Unavailable`
/// (with `weft-bench-fault: injected`) instead of the payload. Shared with whoever changes
/// it while the server runs.
#[derive(Debug, Default)]
pub struct Fault {
    every: AtomicU64,
    seen: AtomicU64,
    failed: AtomicU64,
}

impl Fault {
    /// Fails every `every`-th request (0: none, 1: all).
    pub fn every(every: u64) -> Arc<Self> {
        let f = Fault::default();
        f.every.store(every, Ordering::Relaxed);
        Arc::new(f)
    }

    /// Changes the share from the next request on (1: hard failure, 0: healthy).
    pub fn set_every(&self, every: u64) {
        self.every.store(every, Ordering::Relaxed);
    }

    /// Decides the next request.
    fn next_fails(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        let fail = fails(self.every.load(Ordering::Relaxed), n);
        if fail {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        fail
    }

    /// Requests answered 503 so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// The header an injected failure carries.
pub const FAULT_HEADER: &str = "weft-bench-fault";

/// How a served endpoint behaves beyond its response size.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub response_size: usize,
    /// Every response waits this long first (a slow endpoint for `weft-bench balance`).
    pub delay: std::time::Duration,
    /// Counts requests received, when given.
    pub requests: Option<Arc<AtomicU64>>,
    /// Injected failures, when given.
    pub fault: Option<Arc<Fault>>,
}

/// Reads the request's body, then answers 503 with [`FAULT_HEADER`].
async fn injected_failure(req: Request<Incoming>) -> Result<Response<ResponseBody>, hyper::Error> {
    req.into_body().collect().await?;
    let mut response = Response::new(body(Bytes::from_static(b"injected failure\n"), None));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
        .headers_mut()
        .insert(FAULT_HEADER, HeaderValue::from_static("injected"));
    Ok(response)
}

/// Accepts connections on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, response_size: usize) -> anyhow::Result<()> {
    serve_with(
        listener,
        ServeOptions {
            response_size,
            ..ServeOptions::default()
        },
    )
    .await
}

/// [`serve`] with a response delay and a request counter.
pub async fn serve_with(listener: TcpListener, opts: ServeOptions) -> anyhow::Result<()> {
    let payload = Bytes::from(vec![b'b'; opts.response_size]);
    let (delay, requests, fault) = (opts.delay, opts.requests, opts.fault);
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "set_nodelay failed");
        }
        let builder = builder.clone();
        let payload = payload.clone();
        let requests = requests.clone();
        let fault = fault.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                if let Some(r) = &requests {
                    r.fetch_add(1, Ordering::Relaxed);
                }
                let fail = fault.as_ref().is_some_and(|f| f.next_fails());
                let payload = payload.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    if fail {
                        return injected_failure(req).await;
                    }
                    handle(req, payload).await
                }
            });
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// Serves each of `servers` on its own loopback port from one new thread with a
/// current-thread runtime, pinned to `cpu` when given; returns their addresses (in order)
/// once all are bound. They serve until the process exits.
pub fn spawn_thread(
    servers: Vec<ServeOptions>,
    cpu: Option<usize>,
) -> anyhow::Result<Vec<SocketAddr>> {
    use anyhow::Context as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bench-servers".into())
        .spawn(move || {
            let run = || -> anyhow::Result<()> {
                if let Some(cpu) = cpu {
                    crate::sys::affinity::pin_current_thread(cpu)?;
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    let mut addrs = Vec::new();
                    let mut tasks = Vec::new();
                    for opts in servers {
                        let l = TcpListener::bind("127.0.0.1:0").await?;
                        addrs.push(l.local_addr()?);
                        tasks.push(tokio::spawn(serve_with(l, opts)));
                    }
                    let _ = tx.send(Ok(addrs));
                    for t in tasks {
                        let _ = t.await;
                    }
                    Ok(())
                })
            };
            if let Err(e) = run() {
                let _ = tx.send(Err(e));
            }
        })
        .context("starting the server thread")?;
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .context("the bench servers did not start")?
}

/// Binds `addr`, prints `listening <addr>` on stdout (the runner reads it
/// to learn the port), then serves until SIGTERM or Ctrl-C.
pub async fn run(addr: SocketAddr, opts: ServeOptions) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    use tokio::signal::unix::{signal, SignalKind};

    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {local}").context("writing to stdout")?;
        out.flush().context("flushing stdout")?;
    }
    tracing::info!(%local, response_size = opts.response_size, "bench server listening");
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = serve_with(listener, opts) => r,
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Parses the `listening <addr>` line [`run`] prints.
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix("listening ")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_nth_request_fails() {
        let pattern = |every| (0..10).map(|n| fails(every, n)).collect::<Vec<_>>();
        assert_eq!(pattern(0), vec![false; 10]);
        assert_eq!(pattern(1), vec![true; 10]);
        assert_eq!(
            (0..10).filter(|&n| fails(5, n)).collect::<Vec<_>>(),
            vec![4, 9]
        );
        let f = Fault::every(5);
        let got: Vec<bool> = (0..10).map(|_| f.next_fails()).collect();
        assert_eq!(got, pattern(5));
        assert_eq!(f.failed(), 2);
        f.set_every(1);
        assert!(f.next_fails());
        f.set_every(0);
        assert!(!f.next_fails());
        assert_eq!(f.failed(), 3);
    }

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening_line("listening 127.0.0.1:3456\n"),
            Some(SocketAddr::from(([127, 0, 0, 1], 3456)))
        );
        assert_eq!(parse_listening_line("hello"), None);
        assert_eq!(parse_listening_line("listening nowhere"), None);
    }
}
