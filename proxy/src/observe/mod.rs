//! What the proxy tells about each request beyond its metrics: the access log
//! ([`access`]), live taps and distributed traces all read one [`RequestEvent`] per
//! proxied request, per direction.
//!
//! A request is observed only while something consumes the events: [`Observe::begin`]
//! asks each consumer whether it is active (an atomic load each) and returns `None`
//! otherwise, so a proxy with no access log, no tap and no tracing pays a few loads and a
//! branch per request, and nothing is allocated. An observed request carries a [`Draft`]
//! (boxed, one allocation) that the request path fills as it learns the route, the
//! endpoint, the retries and the outcome; the response body's end (or drop) completes it
//! ([`crate::http::body::Recorder`]) and every consumer gets the finished event.
//!
//! Consumers never block the request path: each takes the event into its own bounded
//! queue and counts what it had to drop.

pub mod access;
pub mod tap;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::header;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::http::Cause;
use crate::metrics::Direction;

/// One proxied request, complete.
#[derive(Clone, Debug)]
pub struct RequestEvent {
    pub direction: Direction,
    /// Wall-clock time the request head arrived.
    pub started: SystemTime,
    /// Until the response head went out.
    pub latency: Duration,
    /// Until the response body ended (or was dropped).
    pub duration: Duration,
    /// The client's address (the application on outbound, the peer on inbound).
    pub peer: SocketAddr,
    pub method: http::Method,
    pub version: http::Version,
    /// The authority the request was routed on.
    pub authority: String,
    /// Path and query, as the client sent them.
    pub path: String,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Response body bytes sent to the client.
    pub response_bytes: u64,
    /// The matched route (`kind/namespace/name[/rule]`), when a route matched.
    pub route: Option<Arc<str>>,
    /// Where the request went: the balanced endpoint, or the original destination.
    pub endpoint: Option<SocketAddr>,
    /// Inbound mTLS: the client's verified identity.
    pub client_id: Option<Arc<str>>,
    /// Outbound to a meshed endpoint: the identity the endpoint had to prove.
    pub server_id: Option<Arc<str>>,
    /// The proxy answered itself: the `weft-proxy-error` cause.
    pub error: Option<Cause>,
    /// Retries after the first attempt.
    pub retries: u32,
    /// The response body failed midway (a reset or an upstream error).
    pub body_failed: bool,
}

/// A consumer of request events.
pub trait Sink: Send + Sync + std::fmt::Debug {
    /// Whether this consumer wants the next request: must be cheap (an atomic load).
    fn active(&self) -> bool;
    /// Takes a finished request; must not block (queue it, or drop and count it).
    fn record(&self, event: &Arc<RequestEvent>);
}

/// The consumers of one proxy.
#[derive(Debug, Default)]
pub struct Observe {
    sinks: Vec<Arc<dyn Sink>>,
    /// Distributed tracing, when a collector is configured; `None` reads no trace headers.
    tracer: Option<Arc<trace::Tracer>>,
}

impl Observe {
    /// Nothing observes: `begin` always answers `None`.
    pub fn disabled() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn new(sinks: Vec<Arc<dyn Sink>>) -> Arc<Self> {
        Self::with_tracer(sinks, None)
    }

    pub fn with_tracer(sinks: Vec<Arc<dyn Sink>>, tracer: Option<Arc<trace::Tracer>>) -> Arc<Self> {
        Arc::new(Self { sinks, tracer })
    }

    /// Whether any consumer wants the next request.
    pub fn active(&self) -> bool {
        self.sinks.iter().any(|s| s.active())
    }

    /// Starts observing a request, if anyone is listening or the tracer samples it (which
    /// rewrites the request's trace headers for the next hop).
    pub fn begin<B>(
        self: &Arc<Self>,
        direction: Direction,
        peer: SocketAddr,
        client_id: Option<&Arc<str>>,
        req: &mut http::Request<B>,
    ) -> Option<Box<Draft>> {
        let span = self
            .tracer
            .as_ref()
            .and_then(|t| t.begin(req.headers_mut()));
        if span.is_none() && !self.active() {
            return None;
        }
        let text = |name: header::HeaderName| {
            req.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        Some(Box::new(Draft {
            observe: self.clone(),
            event: RequestEvent {
                direction,
                started: SystemTime::now(),
                latency: Duration::ZERO,
                duration: Duration::ZERO,
                peer,
                method: req.method().clone(),
                version: req.version(),
                authority: String::new(),
                path: req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_else(|| "/".to_string()),
                user_agent: text(header::USER_AGENT),
                referer: text(header::REFERER),
                status: 0,
                grpc_status: None,
                response_bytes: 0,
                route: None,
                endpoint: None,
                client_id: client_id.cloned(),
                server_id: None,
                error: None,
                retries: 0,
                body_failed: false,
            },
            begun: tokio::time::Instant::now(),
            span,
        }))
    }
}

/// A request being observed; the request path fills it in.
#[derive(Debug)]
pub struct Draft {
    observe: Arc<Observe>,
    pub event: RequestEvent,
    begun: tokio::time::Instant,
    /// This hop's span, when the request is traced.
    span: Option<trace::SpanIds>,
}

impl Draft {
    /// Completes the event and hands it to every active consumer.
    pub fn finish(mut self: Box<Self>) {
        self.event.duration = self.begun.elapsed();
        let event = Arc::new(self.event);
        for s in &self.observe.sinks {
            if s.active() {
                s.record(&event);
            }
        }
        if let (Some(ids), Some(t)) = (self.span, &self.observe.tracer) {
            t.record(ids, event);
        }
    }
}

/// Counters of the consumers, registered with the proxy's metrics.
#[derive(Clone, Debug, Default)]
pub struct ObserveMetrics {
    /// `weft_access_log_lines_total{result="written|dropped"}`.
    pub access_log: Family<ResultLabel, Counter>,
    /// `weft_trace_spans_total{result="exported|dropped|failed"}`.
    pub trace_spans: Family<ResultLabel, Counter>,
    /// `weft_tap_events_total{result="sent|dropped"}`.
    pub tap_events: Family<ResultLabel, Counter>,
    /// `weft_taps_open`.
    pub taps_open: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl ObserveMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_access_log_lines",
            "Access log lines by result: written, or dropped because the writer fell behind (WEFT_PROXY_ACCESS_LOG)",
            self.access_log.clone(),
        );
        registry.register(
            "weft_trace_spans",
            "Spans by result: exported to the collector, failed (the export failed or timed out), or dropped because the export queue was full (WEFT_PROXY_TRACE_COLLECTOR_ADDR)",
            self.trace_spans.clone(),
        );
        registry.register(
            "weft_tap_events",
            "Events offered to open taps by result: sent, or dropped because the tap's reader fell behind",
            self.tap_events.clone(),
        );
        registry.register(
            "weft_taps_open",
            "Taps open on the admin port (GET /tap)",
            self.taps_open.clone(),
        );
    }

    pub fn counter(family: &Family<ResultLabel, Counter>, result: &'static str) -> Counter {
        family.get_or_create(&ResultLabel { result }).clone()
    }
}
