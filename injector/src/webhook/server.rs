//! HTTPS for the webhook: TLS from a [`CertStore`], HTTP/1.1 and HTTP/2, four routes.
//!
//! - `POST /mutate`: an AdmissionReview (see [`review`](super::review)); bodies over
//!   [`ServerConfig::max_body_bytes`] get 413 with a JSON error before they are read whole.
//! - `GET /ready`, `GET /live`: 200 once serving (a certificate is always loaded by then).
//! - `GET /metrics`: `weft_injector_reviews_total{result}` in the Prometheus text format.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::namespaces::NamespaceSource;
use super::review::{self, Reply, Verdict};
use super::tls::{CertStore, TlsError};
use crate::patch::InjectConfig;

/// Default request body limit: an AdmissionReview for a Pod is a few kilobytes.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub max_body_bytes: usize,
    /// How long a TLS handshake may take before the connection is dropped.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything a request needs.
pub struct State {
    pub inject: InjectConfig,
    pub namespaces: Box<dyn NamespaceSource>,
    pub server: ServerConfig,
    counts: [AtomicU64; 5],
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("inject", &self.inject)
            .field("server", &self.server)
            .finish()
    }
}

const VERDICTS: [Verdict; 5] = [
    Verdict::Injected,
    Verdict::Skipped,
    Verdict::Ignored,
    Verdict::Denied,
    Verdict::BadRequest,
];

impl State {
    pub fn new(
        inject: InjectConfig,
        namespaces: Box<dyn NamespaceSource>,
        server: ServerConfig,
    ) -> Self {
        Self {
            inject,
            namespaces,
            server,
            counts: Default::default(),
        }
    }

    fn count(&self, v: Verdict) {
        if let Some(i) = VERDICTS.iter().position(|x| *x == v) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn metrics(&self) -> String {
        let mut s = String::from(
            "# HELP weft_injector_reviews_total Admission reviews answered, by result.\n# TYPE weft_injector_reviews_total counter\n",
        );
        for (v, c) in VERDICTS.iter().zip(&self.counts) {
            s.push_str(&format!(
                "weft_injector_reviews_total{{result=\"{}\"}} {}\n",
                v.label(),
                c.load(Ordering::Relaxed)
            ));
        }
        s
    }
}

type Body = Full<Bytes>;

fn json_response(status: u16, body: &Value) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn reply_error(state: &State, status: u16, message: String) -> Response<Body> {
    let reply = Reply::error(status, message);
    state.count(reply.result);
    json_response(reply.status, &reply.body)
}

/// Routes one request.
pub async fn route(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/mutate") => mutate(state, req).await,
        (_, "/mutate") => reply_error(
            &state,
            405,
            format!("{} /mutate: the webhook takes POST", req.method()),
        ),
        (&Method::GET, "/ready") | (&Method::GET, "/live") => text_response(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => text_response(StatusCode::OK, state.metrics()),
        (_, path) => json_response(404, &json!({ "error": format!("no route {path}") })),
    }
}

async fn mutate(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let max = state.server.max_body_bytes;
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_large = || format!("request body larger than the webhook's limit of {max} bytes");
    if declared.is_some_and(|n| n > max as u64) {
        return reply_error(&state, 413, too_large());
    }
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return reply_error(&state, 413, too_large())
        }
        Err(e) => return reply_error(&state, 400, format!("reading the request body: {e}")),
    };
    let reply = review::handle(&body, state.namespaces.as_ref(), &state.inject).await;
    state.count(reply.result);
    json_response(reply.status, &reply.body)
}

/// Serves HTTPS on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    certs: Arc<CertStore>,
    state: Arc<State>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError> {
    let acceptor = TlsAcceptor::from(Arc::new(certs.server_config()?));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(acceptor.clone(), tcp, peer, state.clone()));
    }
    Ok(())
}

async fn connection(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
) {
    let tls = match tokio::time::timeout(state.server.handshake_timeout, acceptor.accept(tcp)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(route(state, req).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
