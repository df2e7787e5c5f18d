//! The bench server: HTTP/1.1 and HTTP/2 (prior knowledge) on one port via
//! hyper-util's auto server. Any request gets `200` with a fixed body of
//! `response_size` bytes once its own body is read; a gRPC request to
//! [`grpc::UNARY_PATH`] gets its message echoed and `grpc-status: 0`.
//!
//! The runner starts it as a child process (`weft-bench server`) so that it
//! can be pinned to the proxies' CPU; the smoke test runs it in-process.

use std::convert::Infallible;
use std::future::{ready, Ready};
use std::net::SocketAddr;

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

/// How a served endpoint behaves beyond its response size.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub response_size: usize,
    /// Every response waits this long first (a slow endpoint for `weft-bench balance`).
    pub delay: std::time::Duration,
    /// Counts requests received, when given.
    pub requests: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
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
    let (delay, requests) = (opts.delay, opts.requests);
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
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                if let Some(r) = &requests {
                    r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let payload = payload.clone();
                async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
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

/// Binds `addr`, prints `listening <addr>` on stdout (the runner reads it
/// to learn the port), then serves until SIGTERM or Ctrl-C.
pub async fn run(addr: SocketAddr, response_size: usize) -> anyhow::Result<()> {
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
    tracing::info!(%local, response_size, "bench server listening");
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = serve(listener, response_size) => r,
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
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening_line("listening 127.0.0.1:3456\n"),
            Some(SocketAddr::from(([127, 0, 0, 1], 3456)))
        );
        assert_eq!(parse_listening_line("hello"), None);
        assert_eq!(parse_listening_line("listening nowhere"), None);
    }
}
