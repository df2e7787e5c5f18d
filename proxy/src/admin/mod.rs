//! The admin server: `/metrics`, `/ready`, `/live`, `/shutdown`, `/log-level`.
//!
//! It listens on all interfaces so Prometheus can scrape it, but the endpoints that change the
//! proxy (`/shutdown`, `PUT /log-level`) answer only clients on loopback (the pod's own
//! containers).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use weft_proto::exposition;

use crate::metrics::Metrics;
use crate::telemetry::LogHandle;

/// Shared state the admin endpoints read.
#[derive(Debug)]
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub ready: AtomicBool,
    pub shutdown: CancellationToken,
    pub logs: LogHandle,
    /// The identity client's state when identity is configured: not ready without a valid
    /// certificate.
    pub identity: Option<tokio::sync::watch::Receiver<crate::identity::CertState>>,
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let local_peer = peer.ip().is_loopback();
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                let om = match self.metrics.encode_openmetrics() {
                    Ok(t) => t,
                    Err(_) => {
                        return text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "encoding metrics failed\n",
                        )
                    }
                };
                let accept = req
                    .headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (body, ct) = exposition::negotiate(accept, om);
                let mut r = text(StatusCode::OK, body);
                r.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
                r
            }
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.shutdown.is_cancelled() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if !self.ready.load(Ordering::Acquire) {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: listeners not bound\n",
                    )
                } else if let Some(Err(why)) = self
                    .identity
                    .as_ref()
                    .map(|rx| rx.borrow().readiness(std::time::SystemTime::now()))
                {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    )
                } else {
                    let cert = self.identity.as_ref().and_then(|rx| match &*rx.borrow() {
                        crate::identity::CertState::Ready(c) => Some(format!(
                            "ready: certificate for {} valid until {}\n",
                            c.id,
                            crate::identity::rfc3339(c.not_after)
                        )),
                        _ => None,
                    });
                    text(StatusCode::OK, cert.unwrap_or_else(|| "ready\n".into()))
                }
            }
            (&Method::POST, "/shutdown") if local_peer => {
                tracing::info!(%peer, "shutdown requested on the admin port");
                self.shutdown.cancel();
                text(StatusCode::ACCEPTED, "shutting down\n")
            }
            (&Method::GET, "/log-level") => text(
                StatusCode::OK,
                format!("{}\n", self.logs.current().unwrap_or_default()),
            ),
            (&Method::PUT, "/log-level") if local_peer => {
                let body = match Limited::new(req.into_body(), 4096).collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading body: {e}\n")),
                };
                let filter = String::from_utf8_lossy(&body).trim().to_string();
                match self.logs.set_filter(&filter) {
                    Ok(()) => {
                        tracing::info!(%filter, "log filter changed");
                        text(StatusCode::OK, format!("{filter}\n"))
                    }
                    Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
            (_, "/shutdown" | "/log-level") if !local_peer => text(
                StatusCode::FORBIDDEN,
                "this endpoint answers only clients on loopback\n",
            ),
            (_, "/metrics" | "/live" | "/ready" | "/shutdown" | "/log-level") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics /ready /live /shutdown /log-level\n",
            ),
        }
    }
}

/// Serves the admin API until the process exits.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req, peer).await) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10));
            if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}
