//! Golden metrics of the proxy, in one registry served by the admin server.
//!
//! Labels are bounded: direction, authority and client identity (capped at
//! [`MAX_AUTHORITIES`] distinct pairs per direction, then `overflow`), status code,
//! classification, detection result, error cause, TLS status and peer identity (bounded by the
//! cluster's ServiceAccounts). No paths, no per-connection labels.

mod process;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub use weft_proto::exposition::openmetrics_to_prometheus;

/// Distinct authority label values kept per direction before new ones are folded into `overflow`.
pub const MAX_AUTHORITIES: usize = 256;

/// Which side of the pod a connection is on.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Whether a response counts as a success for golden metrics.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Class {
    Success,
    Failure,
}

impl Class {
    /// 5xx, proxy errors and non-zero gRPC statuses are failures.
    pub fn of(status: u16, grpc_status: Option<u32>) -> Self {
        match grpc_status {
            Some(0) => Class::Success,
            Some(_) => Class::Failure,
            None if status >= 500 => Class::Failure,
            None => Class::Success,
        }
    }
}

impl EncodeLabelValue for Class {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(
            encoder,
            match self {
                Class::Success => "success",
                Class::Failure => "failure",
            },
        )
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub authority: Arc<str>,
    /// Inbound: the client's SPIFFE ID when it came over mTLS; empty otherwise.
    pub client_id: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResponseLabels {
    pub direction: Direction,
    pub authority: Arc<str>,
    pub client_id: Arc<str>,
    pub status_code: u16,
    pub grpc_status: String,
    pub classification: Class,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub direction: Direction,
    pub authority: Arc<str>,
    pub client_id: Arc<str>,
    pub classification: Class,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectLabels {
    pub direction: Direction,
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: Direction,
    pub cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `http` or `tcp`.
    pub protocol: &'static str,
    /// `balanced` (an endpoint from discovery), `passthrough` (original destination: the
    /// target is unknown, not resolved yet, or the controller is unreachable) or
    /// `no-endpoints`.
    pub route: &'static str,
}

/// Discovery and balancing: label-free gauges and counters plus routes by (protocol, route).
#[derive(Clone, Debug, Default)]
pub struct DiscoveryMetrics {
    /// Targets with a live resolution.
    pub resolutions: Gauge,
    /// Resolve streams opened (first connect and reconnects).
    pub stream_connects: Counter,
    /// Resolve streams that failed or could not be opened.
    pub stream_errors: Counter,
    /// Updates received from the controller.
    pub updates: Counter,
    /// Balancers (target × protocol) alive.
    pub balancers: Gauge,
    /// Endpoints across all balancers.
    pub endpoints: Gauge,
    pub routes: Family<RouteLabels, Counter>,
    /// Requests sent to a second endpoint after an attempt failed, by why that was safe.
    pub retries: Family<RetryLabels, Counter>,
    /// Endpoints ejected by their circuit breaker.
    pub ejections: Counter,
    /// Endpoints ejected now, or back on probation and not yet restored by a success.
    pub ejected: Gauge,
}

/// Outbound requests routed by a Gateway API route (HTTPRoute/GRPCRoute rule), with bounded
/// labels: `route="<kind>/<ns>/<name>/<rule>"`, `backend` a service port or `invalid`.
#[derive(Clone, Debug, Default)]
pub struct RouteMetrics {
    pub requests: Family<RouteBackendLabels, Counter>,
    pub responses: Family<RouteResultLabels, Counter>,
    /// Retries by why they were made: `status`, `grpc-status`, `timeout`, `failed`.
    pub retries: Family<RouteReasonLabels, Counter>,
    /// Retries the budget refused.
    pub budget_exhausted: Family<RouteLabel, Counter>,
    /// Timeouts by kind: `request`, `backend-request`.
    pub timeouts: Family<RouteReasonLabels, Counter>,
    /// RequestMirror copies by result: `answered`, `failed`, `skipped`.
    pub mirrors: Family<MirrorLabels, Counter>,
}

impl RouteMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "weft_route_requests",
            "Outbound requests that matched a route rule, by backend (a service port, or invalid)",
            self.requests.clone(),
        );
        registry.register(
            "weft_route_responses",
            "Responses to requests that matched a route rule, by classification (success, failure)",
            self.responses.clone(),
        );
        registry.register(
            "weft_route_retries",
            "Retries made by a route's retry policy, by reason: status, grpc-status, timeout, failed",
            self.retries.clone(),
        );
        registry.register(
            "weft_route_retry_budget_exhausted",
            "Retries a route's policy wanted that the service's retry budget refused",
            self.budget_exhausted.clone(),
        );
        registry.register(
            "weft_route_timeouts",
            "Route timeouts that expired, by kind: request (the whole request), backend-request (one attempt)",
            self.timeouts.clone(),
        );
        registry.register(
            "weft_route_mirrors",
            "Copies of requests sent by a route's RequestMirror, by mirror backend and result: answered (any status), failed (error, timeout, or cut off for falling behind the request's body), skipped (no ready endpoint)",
            self.mirrors.clone(),
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackendLabels {
    pub route: Arc<str>,
    pub backend: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub route: Arc<str>,
    pub backend: Arc<str>,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResultLabels {
    pub route: Arc<str>,
    pub classification: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteReasonLabels {
    pub route: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    /// `unsent`, `refused` or `connection-lost` ([`crate::resilience::Again`]).
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// The identity client: certificate expiry, Certify outcomes, readiness.
#[derive(Clone, Debug, Default)]
pub struct IdentityMetrics {
    /// notAfter of the held certificate, Unix seconds (0 before the first one).
    pub expiry: Gauge,
    pub certify: Family<ResultLabels, Counter>,
    /// 1 while a valid certificate is held.
    pub ready: Gauge,
    /// Trust anchors in use.
    pub anchors: Gauge,
    pub anchor_reloads: Family<ResultLabels, Counter>,
}

impl IdentityMetrics {
    pub fn ok(&self) {
        self.certify
            .get_or_create(&ResultLabels { result: "ok" })
            .inc();
    }
    pub fn error(&self) {
        self.certify
            .get_or_create(&ResultLabels { result: "error" })
            .inc();
    }
    pub fn anchors_reloaded(&self, result: &'static str) {
        self.anchor_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub direction: Direction,
    /// `true`, or why the connection is not mesh TLS (see [`TlsStatus`]).
    pub tls: &'static str,
    /// The peer's SPIFFE ID when `tls="true"`, else empty.
    pub peer_id: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeErrorLabels {
    pub direction: Direction,
    pub reason: &'static str,
}

/// A connection's mesh-TLS status: the `tls` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsStatus {
    /// Mutual TLS between proxies, peer identity verified.
    Mtls,
    /// This proxy has no identity (`WEFT_PROXY_IDENTITY_ADDR` unset): no mTLS at all.
    NoIdentity,
    /// Outbound: the endpoint (or original destination) is not known to be meshed, or its
    /// port is opaque on the peer.
    NotMeshed,
    /// Inbound: the client did not speak TLS.
    Plaintext,
    /// Inbound: TLS not addressed to this workload's identity (an app's own TLS), relayed
    /// untouched.
    Passthrough,
}

impl TlsStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsStatus::Mtls => "true",
            TlsStatus::NoIdentity => "no-identity",
            TlsStatus::NotMeshed => "not-meshed",
            TlsStatus::Plaintext => "plaintext",
            TlsStatus::Passthrough => "passthrough",
        }
    }
}

/// Mesh TLS: connections by TLS status and peer, and handshake failures.
#[derive(Clone, Debug, Default)]
pub struct TlsMetrics {
    pub connections: Family<TlsLabels, Counter>,
    pub handshake_errors: Family<HandshakeErrorLabels, Counter>,
}

impl TlsMetrics {
    /// The counter of `direction` connections with `status` (and `peer_id` for mTLS).
    pub fn connections(&self, direction: Direction, status: TlsStatus, peer_id: &str) -> Counter {
        self.connections
            .get_or_create(&TlsLabels {
                direction,
                tls: status.as_str(),
                peer_id: Arc::from(peer_id),
            })
            .clone()
    }

    pub fn handshake_error(&self, direction: Direction, reason: &'static str) {
        self.handshake_errors
            .get_or_create(&HandshakeErrorLabels { direction, reason })
            .inc();
    }
}

/// Series of one (direction, authority): the request counter, and response counters and
/// latency histograms created on first use.
pub struct AuthorityMetrics {
    metrics: Arc<Metrics>,
    pub direction: Direction,
    pub label: Arc<str>,
    pub client_id: Arc<str>,
    requests: Counter,
    /// A few (status, grpc-status, class) series: almost every authority sees a handful.
    responses: Mutex<Vec<ResponseSeries>>,
    latency: [OnceLock<Histogram>; 2],
}

/// (status, grpc-status, class) and its counter.
type ResponseSeries = (u16, Option<u32>, Class, Counter);

/// Response series cached per authority; rarer combinations go through the family's map.
const CACHED_RESPONSE_SERIES: usize = 16;

impl fmt::Debug for AuthorityMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthorityMetrics")
            .field("direction", &self.direction)
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl AuthorityMetrics {
    fn new(
        metrics: Arc<Metrics>,
        direction: Direction,
        label: Arc<str>,
        client_id: Arc<str>,
    ) -> Arc<Self> {
        let requests = metrics
            .http_requests
            .get_or_create(&RequestLabels {
                direction,
                authority: label.clone(),
                client_id: client_id.clone(),
            })
            .clone();
        Arc::new(Self {
            metrics,
            direction,
            label,
            client_id,
            requests,
            responses: Mutex::new(Vec::new()),
            latency: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// Counts a request received.
    pub fn request(&self) {
        self.requests.inc();
    }

    /// Counts a response and observes its latency.
    pub fn response(&self, status: u16, grpc_status: Option<u32>, class: Class, latency: Duration) {
        {
            let mut cached = match self.responses.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            if let Some((.., c)) = cached
                .iter()
                .find(|(s, g, k, _)| *s == status && *g == grpc_status && *k == class)
            {
                c.inc();
            } else {
                let counter = self
                    .metrics
                    .http_responses
                    .get_or_create(&ResponseLabels {
                        direction: self.direction,
                        authority: self.label.clone(),
                        client_id: self.client_id.clone(),
                        status_code: status,
                        grpc_status: grpc_status.map(|s| s.to_string()).unwrap_or_default(),
                        classification: class,
                    })
                    .clone();
                counter.inc();
                if cached.len() < CACHED_RESPONSE_SERIES {
                    cached.push((status, grpc_status, class, counter));
                }
            }
        }
        self.latency[class as usize]
            .get_or_init(|| {
                self.metrics
                    .http_latency
                    .get_or_create(&LatencyLabels {
                        direction: self.direction,
                        authority: self.label.clone(),
                        client_id: self.client_id.clone(),
                        classification: class,
                    })
                    .clone()
            })
            .observe(latency.as_secs_f64());
    }
}

/// Latency buckets in seconds: sub-millisecond resolution for mesh hops, up to 10 s.
const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Admitted authorities of one direction, by client identity ("" without mTLS).
#[derive(Default)]
struct AuthoritySet {
    by_client: HashMap<Arc<str>, HashMap<Arc<str>, Arc<AuthorityMetrics>>>,
    len: usize,
}

/// All proxy metrics. Cheap to clone handles out of; shared behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_responses: Family<ResponseLabels, Counter>,
    pub http_latency: Family<LatencyLabels, Histogram, fn() -> Histogram>,
    pub tcp_open: Family<DirLabels, Gauge>,
    pub tcp_total: Family<DirLabels, Counter>,
    pub tcp_read: Family<DirLabels, Counter>,
    pub tcp_write: Family<DirLabels, Counter>,
    pub detect: Family<DetectLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub discovery: DiscoveryMetrics,
    /// The ClientPolicy streams.
    pub policy: crate::route::client::PolicyMetrics,
    /// Requests by route and backend (outbound, routed by a ClientPolicy).
    pub routes: RouteMetrics,
    /// Inbound authorization decisions and the ServerPolicy streams.
    pub authz: crate::authz::AuthzMetrics,
    pub identity: IdentityMetrics,
    pub tls: TlsMetrics,
    /// Access log, tap and trace consumers ([`crate::observe`]).
    pub observe: crate::observe::ObserveMetrics,
    /// Per-direction handles of admitted (client identity, authority) pairs; see
    /// [`Metrics::authority`].
    authorities: Mutex<[AuthoritySet; 2]>,
    overflow: [OnceLock<Arc<AuthorityMetrics>>; 2],
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let http_requests = Family::<RequestLabels, Counter>::default();
        let http_responses = Family::<ResponseLabels, Counter>::default();
        let http_latency =
            Family::<LatencyLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        let tcp_open = Family::<DirLabels, Gauge>::default();
        let tcp_total = Family::<DirLabels, Counter>::default();
        let tcp_read = Family::<DirLabels, Counter>::default();
        let tcp_write = Family::<DirLabels, Counter>::default();
        let detect = Family::<DetectLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "weft_http_requests",
            "HTTP requests received by the proxy",
            http_requests.clone(),
        );
        registry.register(
            "weft_http_responses",
            "HTTP responses sent by the proxy, by status code and classification",
            http_responses.clone(),
        );
        registry.register(
            "weft_http_response_duration_seconds",
            "Time from receiving a request to sending its response headers",
            http_latency.clone(),
        );
        registry.register(
            "weft_tcp_connections_open",
            "TCP connections currently open",
            tcp_open.clone(),
        );
        registry.register(
            "weft_tcp_connections",
            "TCP connections accepted",
            tcp_total.clone(),
        );
        registry.register(
            "weft_tcp_read_bytes",
            "Bytes read from accepted connections",
            tcp_read.clone(),
        );
        registry.register(
            "weft_tcp_write_bytes",
            "Bytes written to accepted connections",
            tcp_write.clone(),
        );
        registry.register(
            "weft_detect",
            "Protocol detection outcomes (http1, http2, tls, opaque, timeout, closed, skipped)",
            detect.clone(),
        );
        registry.register(
            "weft_proxy_errors",
            "Errors the proxy answered or reset itself, by cause",
            errors.clone(),
        );
        let discovery = DiscoveryMetrics::default();
        registry.register(
            "weft_discovery_resolutions",
            "Targets the proxy currently resolves through the controller",
            discovery.resolutions.clone(),
        );
        registry.register(
            "weft_discovery_stream_connects",
            "Resolve streams opened to the controller (including reconnects)",
            discovery.stream_connects.clone(),
        );
        registry.register(
            "weft_discovery_stream_errors",
            "Resolve streams that failed or could not be opened",
            discovery.stream_errors.clone(),
        );
        registry.register(
            "weft_discovery_updates",
            "Endpoint updates received from the controller",
            discovery.updates.clone(),
        );
        registry.register(
            "weft_balancer_balancers",
            "Load balancers (target and protocol) alive",
            discovery.balancers.clone(),
        );
        registry.register(
            "weft_balancer_endpoints",
            "Endpoints across all load balancers",
            discovery.endpoints.clone(),
        );
        registry.register(
            "weft_outbound_routes",
            "Outbound HTTP requests and TCP connections by route: balanced, passthrough, no-endpoints",
            discovery.routes.clone(),
        );
        registry.register(
            "weft_outbound_ejections",
            "Endpoints ejected by the circuit breaker after consecutive failures (5xx, connection errors)",
            discovery.ejections.clone(),
        );
        registry.register(
            "weft_outbound_endpoints_ejected",
            "Endpoints ejected by their circuit breaker now, or probed after it and not yet restored by a success",
            discovery.ejected.clone(),
        );
        registry.register(
            "weft_outbound_retries",
            "Outbound HTTP requests sent to another endpoint after an attempt failed before reaching the application, by reason: unsent, refused, connection-lost",
            discovery.retries.clone(),
        );
        let policy = crate::route::client::PolicyMetrics::default();
        crate::route::client::register(&policy, &mut registry);
        let authz = crate::authz::AuthzMetrics::default();
        authz.register(&mut registry);
        let routes = RouteMetrics::default();
        routes.register(&mut registry);
        let identity = IdentityMetrics::default();
        registry.register(
            "weft_identity_cert_expiry_timestamp_seconds",
            "Expiry (notAfter) of the proxy's workload certificate, Unix seconds; 0 before the first",
            identity.expiry.clone(),
        );
        registry.register(
            "weft_identity_certify",
            "Certify requests to the identity service by result: ok, error",
            identity.certify.clone(),
        );
        registry.register(
            "weft_identity_ready",
            "1 while the proxy holds a valid workload certificate (identity configured), else 0",
            identity.ready.clone(),
        );
        let tls = TlsMetrics::default();
        registry.register(
            "weft_tls_connections",
            "Connections by mesh-TLS status: tls=\"true\" with the peer's identity, or why not (no-identity, not-meshed, plaintext, passthrough); inbound counts accepted connections, outbound the connections opened to endpoints",
            tls.connections.clone(),
        );
        registry.register(
            "weft_tls_handshake_errors",
            "Mesh TLS handshakes that failed, by reason (wrong-identity, untrusted, expired, no-client-certificate, no-local-certificate, peer-refused, timeout, protocol)",
            tls.handshake_errors.clone(),
        );
        registry.register(
            "weft_identity_trust_anchors",
            "Trust anchors (roots) the proxy verifies peers and its own certificate against",
            identity.anchors.clone(),
        );
        registry.register(
            "weft_identity_trust_anchor_reloads",
            "Reloads of WEFT_PROXY_TRUST_ANCHORS after the file changed, by result: ok, error (the previous anchors stay in use)",
            identity.anchor_reloads.clone(),
        );
        let observe = crate::observe::ObserveMetrics::default();
        observe.register(&mut registry);
        registry.register_collector(Box::new(process::ProcessCollector::new()));
        Arc::new(Self {
            registry,
            http_requests,
            http_responses,
            http_latency,
            tcp_open,
            tcp_total,
            tcp_read,
            tcp_write,
            detect,
            errors,
            discovery,
            policy,
            routes,
            authz,
            identity,
            tls,
            observe,
            authorities: Mutex::new([AuthoritySet::default(), AuthoritySet::default()]),
            overflow: [OnceLock::new(), OnceLock::new()],
        })
    }

    /// The metric handles for requests to `authority` in `direction` from `client_id` (the
    /// client's SPIFFE ID on inbound mTLS connections, else ""). Each direction admits
    /// [`MAX_AUTHORITIES`] distinct pairs; later ones share the `overflow` handles. The
    /// handles hold the families' series directly, so recording a request costs no label
    /// hashing (callers cache the `Arc` per connection).
    pub fn authority(
        self: &Arc<Self>,
        direction: Direction,
        authority: &str,
        client_id: &Arc<str>,
    ) -> Arc<AuthorityMetrics> {
        let idx = direction as usize;
        let mut sets = match self.authorities.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let set = &mut sets[idx];
        if let Some(a) = set
            .by_client
            .get(&**client_id)
            .and_then(|m| m.get(authority))
        {
            return a.clone();
        }
        if set.len >= MAX_AUTHORITIES {
            drop(sets);
            return self.overflow[idx]
                .get_or_init(|| {
                    AuthorityMetrics::new(
                        self.clone(),
                        direction,
                        Arc::from("overflow"),
                        Arc::from(""),
                    )
                })
                .clone();
        }
        let label: Arc<str> = Arc::from(authority);
        let handles =
            AuthorityMetrics::new(self.clone(), direction, label.clone(), client_id.clone());
        set.by_client
            .entry(client_id.clone())
            .or_default()
            .insert(label, handles.clone());
        set.len += 1;
        handles
    }

    pub fn error(&self, direction: Direction, cause: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { direction, cause })
            .inc();
    }

    pub fn detected(&self, direction: Direction, protocol: &'static str) {
        self.detect
            .get_or_create(&DetectLabels {
                direction,
                protocol,
            })
            .inc();
    }

    /// Per-direction TCP handles, resolved once per listener.
    pub fn tcp(&self, direction: Direction) -> TcpMetrics {
        let l = DirLabels { direction };
        TcpMetrics {
            open: self.tcp_open.get_or_create(&l).clone(),
            total: self.tcp_total.get_or_create(&l).clone(),
            read: self.tcp_read.get_or_create(&l).clone(),
            write: self.tcp_write.get_or_create(&l).clone(),
        }
    }

    /// Renders the registry as OpenMetrics text.
    pub fn encode_openmetrics(&self) -> Result<String, fmt::Error> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Counters for one listener's connections.
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    pub open: Gauge,
    pub total: Counter,
    pub read: Counter,
    pub write: Counter,
}

impl TcpMetrics {
    /// Counts a connection open until the guard drops.
    pub fn open_guard(&self) -> OpenGuard {
        self.total.inc();
        self.open.inc();
        OpenGuard(self.open.clone())
    }
}

/// Decrements the open-connections gauge on drop.
#[derive(Debug)]
pub struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_labels_are_bounded() {
        let m = Metrics::new();
        let none: Arc<str> = Arc::from("");
        for i in 0..MAX_AUTHORITIES {
            assert_eq!(
                &*m.authority(Direction::Outbound, &format!("a{i}:80"), &none)
                    .label,
                format!("a{i}:80")
            );
        }
        assert_eq!(
            &*m.authority(Direction::Outbound, "new:80", &none).label,
            "overflow"
        );
        assert_eq!(
            &*m.authority(Direction::Outbound, "a1:80", &none).label,
            "a1:80"
        );
        assert_eq!(
            &*m.authority(Direction::Inbound, "new:80", &none).label,
            "new:80"
        );
    }

    #[test]
    fn classification() {
        assert_eq!(Class::of(200, None), Class::Success);
        assert_eq!(Class::of(404, None), Class::Success);
        assert_eq!(Class::of(503, None), Class::Failure);
        assert_eq!(Class::of(200, Some(14)), Class::Failure);
        assert_eq!(Class::of(200, Some(0)), Class::Success);
    }

    #[test]
    fn encodes_golden_metrics() {
        let m = Metrics::new();
        let a = m.authority(Direction::Outbound, "web:80", &Arc::from(""));
        let b = m.authority(
            Direction::Inbound,
            "web:80",
            &Arc::from("spiffe://cluster.local/ns/a/sa/b"),
        );
        b.request();
        m.tls
            .connections(
                Direction::Inbound,
                TlsStatus::Mtls,
                "spiffe://cluster.local/ns/a/sa/b",
            )
            .inc();
        m.tls.handshake_error(Direction::Outbound, "wrong-identity");
        a.request();
        a.response(200, None, Class::Success, Duration::from_millis(3));
        a.response(200, None, Class::Success, Duration::from_millis(4));
        a.response(503, None, Class::Failure, Duration::from_millis(1));
        m.error(Direction::Inbound, "connect-refused");
        let om = m.encode_openmetrics().unwrap();
        assert!(
            om.contains(r#"weft_http_requests_total{direction="outbound",authority="web:80",client_id=""} 1"#),
            "{om}"
        );
        assert!(om.contains(
            r#"weft_http_responses_total{direction="outbound",authority="web:80",client_id="",status_code="200",grpc_status="",classification="success"} 2"#
        ), "{om}");
        assert!(om.contains(
            r#"weft_http_response_duration_seconds_count{direction="outbound",authority="web:80",client_id="",classification="failure"} 1"#
        ), "{om}");
        assert!(om
            .contains(r#"weft_proxy_errors_total{direction="inbound",cause="connect-refused"} 1"#));
        assert!(om.contains(
            r#"weft_http_requests_total{direction="inbound",authority="web:80",client_id="spiffe://cluster.local/ns/a/sa/b"} 1"#
        ), "{om}");
        assert!(om.contains(
            r#"weft_tls_connections_total{direction="inbound",tls="true",peer_id="spiffe://cluster.local/ns/a/sa/b"} 1"#
        ), "{om}");
        assert!(
            om.contains(
                r#"weft_tls_handshake_errors_total{direction="outbound",reason="wrong-identity"} 1"#
            ),
            "{om}"
        );
        assert!(om.contains("process_resident_memory_bytes "), "{om}");
        let prom = openmetrics_to_prometheus(&om);
        assert!(prom.contains("# TYPE weft_http_requests_total counter"));
        assert!(!prom.contains("# EOF"));
    }
}
