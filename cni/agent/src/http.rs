//! The metrics server (`--metrics-addr`, default 0.0.0.0:9964): `/metrics` (OpenMetrics when
//! asked for, else Prometheus text 0.0.4: `weft_proto::exposition`), `/ready` (200 once the source has synced and the datapath is open), `/status` (the node's
//! CNI state as JSON, counts only: [`crate::status`]), and `/flows`
//! (the live NDJSON flow stream, see [`crate::flows`]) for loopback clients only: flows name
//! pods and addresses, which the metrics port does not otherwise expose.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio::net::TcpListener;
use tokio::sync::broadcast::error::RecvError;

use crate::agent::Agent;
use crate::dataplane::Dataplane;
use crate::flows::FlowHub;
use crate::metrics::LOST_SLOW_READER;

type Body = BoxBody<Bytes, Infallible>;

pub struct Server<D: Dataplane> {
    pub agent: Arc<Agent<D>>,
    pub hub: FlowHub,
    pub source_metrics: Option<weft_controller::metrics::Metrics>,
    pub status: Arc<crate::status::StatusSource>,
}

impl<D: Dataplane> Clone for Server<D> {
    fn clone(&self) -> Self {
        Server {
            agent: self.agent.clone(),
            hub: self.hub.clone(),
            source_metrics: self.source_metrics.clone(),
            status: self.status.clone(),
        }
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    let mut rsp = Response::new(Full::new(Bytes::from(body.into())).boxed());
    *rsp.status_mut() = status;
    rsp
}

impl<D: Dataplane> Server<D> {
    pub fn respond(
        &self,
        method: &Method,
        path: &str,
        accept: Option<&str>,
        peer: SocketAddr,
    ) -> Response<Body> {
        if method != Method::GET && method != Method::HEAD {
            return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        }
        match path {
            "/metrics" => {
                let status = self.status.gather(&self.agent);
                self.agent
                    .metrics()
                    .observe_status(&status, self.agent.last_sync());
                let (body, content_type) = weft_proto::exposition::negotiate(
                    accept,
                    self.agent.metrics_text(self.source_metrics.as_ref()),
                );
                let mut rsp = text(StatusCode::OK, body);
                rsp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(content_type),
                );
                rsp
            }
            "/ready" if self.agent.is_ready() => text(StatusCode::OK, "ready\n"),
            "/ready" => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the cluster source has not synced yet\n",
            ),
            "/flows" if !peer.ip().is_loopback() => text(
                StatusCode::FORBIDDEN,
                "/flows is served to loopback clients only (run weft cni flows on the node, or \
                 port-forward)\n",
            ),
            "/flows" => self.flows(),
            "/status" => {
                let status = self.status.gather(&self.agent);
                let body = serde_json::to_string_pretty(&status).unwrap_or_default() + "\n";
                let mut rsp = text(StatusCode::OK, body);
                rsp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                rsp
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found; try /metrics, /ready, /status or /flows\n",
            ),
        }
    }

    fn flows(&self) -> Response<Body> {
        let rx = self.hub.subscribe();
        let hub = self.hub.clone();
        let stream = futures_util::stream::unfold((rx, hub), |(mut rx, hub)| async move {
            loop {
                match rx.recv().await {
                    Ok(line) => return Some((Ok(Frame::data(line)), (rx, hub))),
                    Err(RecvError::Lagged(n)) => hub.metrics.lost(LOST_SLOW_READER, n),
                    Err(RecvError::Closed) => return None,
                }
            }
        });
        let mut rsp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
        rsp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/x-ndjson"),
        );
        rsp
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, listener: TcpListener) {
        weft_controller::admin::serve_http(listener, "metrics", move |req, peer| {
            let accept = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            self.respond(req.method(), req.uri().path(), accept, peer)
        })
        .await
    }
}
