//! The admin server (port 9990): `/metrics` (Prometheus text, or OpenMetrics when asked;
//! [`weft_proto::exposition`]), `/ready`
//! (200 once the source has a full view of the cluster, else 503) and
//! `/live` (200 while the process serves).

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use weft_proto::exposition;

use crate::index::Index;
use crate::metrics::Metrics;
use crate::source::Readiness;

#[derive(Clone, Debug)]
pub struct Admin {
    pub metrics: Metrics,
    pub readiness: Readiness,
    pub index: Index,
}

impl Admin {
    /// Answers one admin request (`accept`: its `Accept` header). Pure apart from reading
    /// metrics.
    pub fn respond(
        &self,
        method: &Method,
        path: &str,
        accept: Option<&str>,
    ) -> Response<Full<Bytes>> {
        let text = |status: StatusCode, body: String| {
            let mut rsp = Response::new(Full::new(Bytes::from(body)));
            *rsp.status_mut() = status;
            rsp
        };
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        }
        match path {
            "/metrics" => {
                self.metrics.observe_index(&self.index);
                let (body, content_type) = exposition::negotiate(accept, self.metrics.encode());
                let mut rsp = text(StatusCode::OK, body);
                rsp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                rsp
            }
            "/ready" if self.readiness.is_ready() => text(StatusCode::OK, "ready\n".into()),
            "/ready" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "source has not synced yet\n".into(),
            ),
            "/live" => text(StatusCode::OK, "live\n".into()),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /ready or /live\n".into(),
            ),
        }
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        serve_http(listener, "admin", move |req, _peer| {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            self.respond(req.method(), req.uri().path(), accept)
        })
        .await
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener` until the task is dropped, answering each request
/// with `respond(request, peer)`; `what` names the server in logs. The controller's admin
/// server and the CNI agent's metrics server share it.
pub async fn serve_http<B, F>(listener: TcpListener, what: &'static str, respond: F)
where
    F: Fn(Request<Incoming>, std::net::SocketAddr) -> Response<B> + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, server = what, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let respond = respond.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let rsp = respond(req, peer);
                async move { Ok::<_, Infallible>(rsp) }
            });
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                tracing::debug!(error = %e, server = what, "connection ended");
            }
        });
    }
}
