//! HTTP proxying: HTTP/1.1 and HTTP/2 served by hyper, each request sent to the connection's
//! destination over a pooled client of the same protocol.
//!
//! Per request: destination or authority → metrics labels → header limits → hop-by-hop
//! headers removed → upstream request → response (or a proxy-made error carrying
//! `weft-proxy-error`).
//!
//! Outbound with discovery, a request takes the policy (routes) and endpoints of the address
//! the application connected to when the controller knows that address as a service (a
//! ClusterIP and port): what the Gateway API's mesh profile says (`MeshFrontendHostname`: a
//! route's Service parentRef matches the Service's IP, not the `Host` the client wrote).
//! Otherwise (a pod IP, an address outside the cluster, the proxy addressed explicitly) the
//! request is routed by its authority (`:authority`, else `Host`), and a name the controller
//! does not know passes through to the original destination. Both are decided once per
//! connection and cached ([`LastAuthority`]), so a request does no map lookup.
//! HTTP/1 upgrades (WebSocket) are joined into a byte relay once both sides switch.
//!
//! Between meshed proxies every request travels over one mTLS HTTP/2 connection per endpoint
//! (see [`client`]); upgrades, which HTTP/2 cannot carry, take an mTLS HTTP/1.1 connection.
//! On inbound mTLS connections the client's identity is the `client_id` metrics label and is
//! passed to the application in [`CLIENT_ID`]; the header is removed from every other inbound
//! request, so applications can trust it.

pub mod body;
pub mod client;
pub mod error;
pub mod head;
mod mirror;
mod outbound;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balance::{self, Balancer, InFlight, Pick, Router};
use crate::metrics::{AuthorityMetrics, Direction, Metrics};
use crate::observe::Draft;
use crate::resilience::breaker::BreakerConfig;
use crate::resilience::{replay, Again, Resend};
use crate::route::policy::Policy;
use crate::transport::mesh::{ConnectTlsError, Mesh};
use body::{Observed, Recorder};
use client::{ClientError, Endpoint, PooledBody, Unsent, ORIG_PROTO};
pub use error::Cause;
use tokio::sync::watch;

/// The verified SPIFFE ID of an inbound mTLS client, as given to the application.
pub const CLIENT_ID: HeaderName = HeaderName::from_static("weft-client-id");

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// HTTP/2 flow-control windows, both as server and as client. Fixed and large instead of
/// hyper's adaptive (BDP) windows: BDP estimation sends PING frames during transfers, which
/// costs extra frames and wakeups on the small messages a mesh mostly carries, while these
/// windows already cover a 1 Gbit/s × 30 ms path per stream.
pub const H2_STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const H2_CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// Limits applied to every served HTTP connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
}

/// Everything a request on one accepted connection needs.
#[derive(Debug)]
pub struct ConnCtx {
    pub direction: Direction,
    /// The client's address.
    pub peer: SocketAddr,
    pub target: SocketAddr,
    pub h2: bool,
    pub metrics: Arc<Metrics>,
    /// The original destination's client: where requests go without discovery.
    pub client: Arc<Endpoint>,
    /// Inbound mTLS HTTP/2 connections: the original destination over HTTP/1.1, for requests
    /// a peer proxy carried over HTTP/2 for an HTTP/1 client ([`ORIG_PROTO`]).
    pub h1_client: Option<Arc<Endpoint>>,
    /// Inbound mTLS connections: the client's verified identity.
    pub client_id: Option<Arc<str>>,
    /// Inbound mTLS connections: this proxy's mesh TLS, checked per request so that an
    /// expired certificate stops serving established connections too (fail closed).
    pub mesh: Option<Arc<Mesh>>,
    /// Inbound: the port's authorization policy and the client, decided per request.
    pub authz: Option<crate::authz::Conn>,
    /// Routes requests through discovery (outbound, when a controller is set): by the
    /// original destination when it is a service address, else by authority.
    pub router: Option<Arc<Router>>,
    /// Outbound with discovery: the original destination's policy and balancer when the
    /// controller knows it as a service address (a ClusterIP and port), decided on the
    /// connection's first request; `None` inside: route by authority.
    pub destination: tokio::sync::OnceCell<Option<ServiceDestination>>,
    pub limits: Limits,
    /// The last authority seen on this connection, parsed, with its metric handles and route.
    pub last_authority: std::sync::Mutex<Option<LastAuthority>>,
    /// Access log, taps and traces: each request is offered to them.
    pub observe: Arc<crate::observe::Observe>,
}

/// A connection's last request authority: almost every connection carries one, so it is
/// parsed, looked up in the metrics map and routed once, not per request.
#[derive(Debug)]
pub struct LastAuthority {
    host: Option<HeaderValue>,
    authority: http::uri::Authority,
    metrics: Arc<AuthorityMetrics>,
    /// The authority's balancer; `None` without discovery (original destination).
    route: Option<Arc<Balancer>>,
    /// The authority's outbound policy (routes, timeouts, retries); `None` without discovery.
    policy: Option<watch::Receiver<Arc<Policy>>>,
}

/// A connection's original destination that is a service address (see
/// [`ConnCtx::destination`]): every request on the connection takes this service's routes and
/// endpoints, whatever its `Host` (the Gateway API's mesh semantics: a route's parentRef
/// matches the Service's IP, not the host name the client wrote).
#[derive(Debug)]
pub struct ServiceDestination {
    policy: watch::Receiver<Arc<Policy>>,
    /// The ClusterIP's balancer; `None` when the resolver is at its target limit.
    balancer: Option<Arc<Balancer>>,
}

/// What the request's authority resolved to.
struct Routed {
    authority: http::uri::Authority,
    metrics: Arc<AuthorityMetrics>,
    balancer: Option<Arc<Balancer>>,
    policy: Option<watch::Receiver<Arc<Policy>>>,
    /// First request of this authority on the connection: wait for its policy's first answer.
    fresh: bool,
}

impl LastAuthority {
    fn routed(&self) -> Routed {
        Routed {
            authority: self.authority.clone(),
            metrics: self.metrics.clone(),
            balancer: self.route.clone(),
            policy: self.policy.clone(),
            fresh: false,
        }
    }
}

/// Why a request could not be sent.
enum SendError {
    Client(ClientError),
    NoEndpoints,
    /// The request timeout (the whole request, retries included) expired.
    Timeout(Duration),
    /// The per-attempt timeout (`timeouts.backendRequest`) expired on the last attempt.
    AttemptTimeout(Duration),
    /// Every endpoint is at its concurrency limit and the pending limit is reached.
    Overloaded,
}

/// Serves HTTP/1.1 on `io` until the client closes or the drain signal asks it to stop.
pub async fn serve_http1<I>(io: I, ctx: Arc<ConnCtx>, drain: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = ctx.limits;
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(proxy(&ctx, req).await) }
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // Four times the head limit: a later request on a keep-alive connection whose head is
        // over the limit but within this buffer reaches `proxy()`, which answers 431 with
        // `weft-proxy-error`; only heads beyond it get hyper's own bare 431. hyper's default
        // header count (100, parsed on the stack) is `head::MAX_HEADERS`.
        .max_buf_size(limits.max_header_bytes.max(16 * 1024) * 4 + 8192)
        .pipeline_flush(true);
    let conn = b.serve_connection(TokioIo::new(io), svc).with_upgrades();
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "http/1 connection ended with an error");
    }
}

/// Serves HTTP/2 (prior knowledge) on `io`.
pub async fn serve_http2<I>(io: I, ctx: Arc<ConnCtx>, drain: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = ctx.limits;
    let svc = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(proxy(&ctx, req).await) }
    });
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_header_list_size(limits.max_header_bytes as u32);
    let conn = b.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let res = tokio::select! {
        r = conn.as_mut() => r,
        _ = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, "http/2 connection ended with an error");
    }
}

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Fast path: most messages carry none of these; one pass over the names is far cheaper
    // than a hashed removal per hop-by-hop name.
    if !keep_upgrade
        && !headers
            .keys()
            .any(|k| k == header::TE || HOP_BY_HOP.iter().any(|h| h == k))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in HOP_BY_HOP.iter() {
        if keep_upgrade && (n == header::CONNECTION || n == header::UPGRADE) {
            continue;
        }
        headers.remove(n);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // `TE: trailers` is end-to-end for gRPC; any other TE value is hop-by-hop.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The request's authority: `:authority`/absolute URI, else `Host`, else the destination.
fn authority_of<B>(req: &Request<B>, target: SocketAddr) -> Result<http::uri::Authority, Cause> {
    if let Some(a) = req.uri().authority() {
        return Ok(a.clone());
    }
    match req.headers().get(header::HOST) {
        Some(h) => h
            .to_str()
            .ok()
            .and_then(|s| s.parse::<http::uri::Authority>().ok())
            .filter(|a| !a.host().is_empty())
            .ok_or(Cause::BadAuthority),
        None => target.to_string().parse().map_err(|_| Cause::BadAuthority),
    }
}

fn headers_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

/// Finds the cause of a failed upstream request.
fn cause_of(err: &(dyn std::error::Error + 'static)) -> Cause {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        match e.downcast_ref::<ClientError>() {
            Some(ClientError::Connect(c)) => return Cause::of_connect(&c.source),
            Some(ClientError::Tls {
                source: ConnectTlsError::NoCertificate(_),
                ..
            }) => return Cause::IdentityUnavailable,
            Some(ClientError::Tls { .. }) => return Cause::TlsHandshake,
            Some(r @ ClientError::Request { .. })
                if crate::resilience::failure_of(r) != crate::resilience::Failure::Other =>
            {
                return Cause::UpstreamReset
            }
            _ => {}
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) {
                return Cause::UpstreamReset;
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() || h.is_closed() {
                return Cause::UpstreamReset;
            }
        }
        cur = e.source();
    }
    Cause::UpstreamError
}

impl ConnCtx {
    fn client_label(&self) -> &Arc<str> {
        static NONE: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
        match &self.client_id {
            Some(id) => id,
            None => NONE.get_or_init(|| Arc::from("")),
        }
    }

    fn last_authority(&self) -> std::sync::MutexGuard<'_, Option<LastAuthority>> {
        match self.last_authority.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        }
    }

    /// The connection's original destination when the controller knows it as a service
    /// address (outbound with discovery only). Looked up once per connection: the first
    /// request waits for the destination's ClientPolicy (up to the discovery timeout); after
    /// that this is one atomic load. A destination that becomes a service later is routed by
    /// authority until the connection is replaced.
    async fn service_destination(&self) -> Option<&ServiceDestination> {
        if let Some(d) = self.destination.get() {
            return d.as_ref();
        }
        let router = self
            .router
            .as_ref()
            .filter(|_| self.direction == Direction::Outbound)?;
        // Once per connection, boxed: the request's own future stays as small as before and
        // the lookup's code is not inlined into every caller's.
        let lookup: std::pin::Pin<
            Box<dyn std::future::Future<Output = &Option<ServiceDestination>> + Send + '_>,
        > = Box::pin(self.destination.get_or_init(|| async {
            let target = self.target.to_string();
            let policy = router.policies().ready(&target).await;
            // Not a service: a pod IP, an address outside the cluster, the proxy
            // addressed explicitly.
            let is_service = policy.borrow().service.is_some();
            if !is_service {
                return None;
            }
            tracing::debug!(%target, "routing by the original destination, a service address");
            Some(ServiceDestination {
                balancer: router.balancer(&target, self.protocol()),
                policy,
            })
        }));
        lookup.await.as_ref()
    }

    fn protocol(&self) -> balance::Protocol {
        if self.h2 {
            balance::Protocol::Http2
        } else {
            balance::Protocol::Http1
        }
    }

    /// The request's authority, its metric handles and its balancer and policy, from the
    /// connection's cache when the `Host` header or the authority repeats. `destination`:
    /// the connection's service destination, whose balancer and policy win over the
    /// authority's (the authority then only names the metrics).
    fn authority<B>(
        &self,
        req: &Request<B>,
        destination: Option<&ServiceDestination>,
    ) -> Result<Routed, Cause> {
        let host = req.headers().get(header::HOST);
        let mut last = self.last_authority();
        if req.uri().authority().is_none() {
            if let (Some(host), Some(l)) = (host, &*last) {
                if l.host.as_ref() == Some(host) {
                    return Ok(l.routed());
                }
            }
        }
        let authority = authority_of(req, self.target)?;
        if let Some(l) = &mut *last {
            if l.authority == authority {
                if l.host.as_ref() != host {
                    l.host = host.cloned();
                }
                return Ok(l.routed());
            }
        }
        let metrics =
            self.metrics
                .authority(self.direction, authority.as_str(), self.client_label());
        let (route, policy) = match destination {
            Some(d) => (d.balancer.clone(), Some(d.policy.clone())),
            None => {
                let target = balance::http_target(&authority);
                let route = self
                    .router
                    .as_ref()
                    .and_then(|r| r.balancer(&target, self.protocol()));
                // Outbound only: inbound requests are the local application's, not routed.
                let policy = self
                    .router
                    .as_ref()
                    .filter(|_| self.direction == Direction::Outbound)
                    .map(|r| r.policies().get(&target));
                (route, policy)
            }
        };
        let l = LastAuthority {
            host: host.cloned(),
            authority,
            metrics,
            route,
            policy,
        };
        let mut routed = l.routed();
        // The destination's policy was waited for already.
        routed.fresh = destination.is_none();
        *last = Some(l);
        Ok(routed)
    }

    /// Sends `req` to an endpoint of `route`, or to the original destination. `h1`: the
    /// request must go over HTTP/1.1 (an upgrade, or an HTTP/1 request a peer proxy carried
    /// over HTTP/2).
    ///
    /// An attempt that fails before the request reached the application (see
    /// [`crate::resilience`] for exactly when) goes once more to another endpoint, in the
    /// form the client sent it; the failing endpoint's estimate is raised so p2c avoids it.
    ///
    /// `exclude`: an endpoint to avoid if another exists (the one a retry follows); `resend`:
    /// the caller's replayable copy of the request, if it made one.
    async fn send(
        &self,
        route: Option<&Arc<Balancer>>,
        mut req: Request<BoxBody>,
        h1: bool,
        exclude: Option<SocketAddr>,
        resend: Option<&Resend>,
        breaker: &BreakerConfig,
    ) -> Result<(Response<PooledBody>, Option<InFlight>), SendError> {
        let Some(b) = route else {
            return self.forward(req, h1).await;
        };
        let limit = breaker.max_concurrent_requests;
        let picked = loop {
            match b.pick_ready_within(exclude, limit).await {
                Pick::Overloaded => {
                    if !b.wait_for_capacity(breaker.max_pending_requests).await {
                        return Err(SendError::Overloaded);
                    }
                }
                p => break p,
            }
        };
        let first = match picked {
            Pick::Endpoint(f) => f,
            Pick::NoEndpoints => return Err(SendError::NoEndpoints),
            Pick::Pending => {
                b.passthrough();
                return self.forward(req, h1).await;
            }
            Pick::Forward => return self.forward(req, h1).await,
            Pick::Overloaded => return Err(SendError::Overloaded),
        };
        let Some(ep) = first.member().http_endpoint(h1) else {
            return self.forward(req, h1).await;
        };
        // An upgrade that left is the client's byte stream now: only an unsent one may move.
        let own;
        let resend = match resend {
            Some(r) => Some(r),
            None if !h1 && b.len() > 1 => {
                own = Resend::prepare(&mut req, replay::DEFAULT_CAP);
                Some(&own)
            }
            None => None,
        };
        let start = Instant::now();
        let (req, why, error) = match ep.try_request(req).await {
            Ok(rsp) => {
                observe(first.member(), start, &rsp);
                b.record(first.member(), !rsp.status().is_server_error(), breaker);
                return Ok((rsp, Some(first)));
            }
            Err(Unsent {
                error,
                request: Some(req),
            }) => (req, Again::Unsent, error),
            Err(Unsent {
                error,
                request: None,
            }) => match resend.and_then(|r| r.after(&error)) {
                Some((req, why)) => (req, why, error),
                None => {
                    b.record(first.member(), false, breaker);
                    return Err(SendError::Client(error));
                }
            },
        };
        b.attempt_failed(first.member());
        b.record(first.member(), false, breaker);
        let failed = first.member().addr;
        drop(first);
        tracing::debug!(target = b.target(), endpoint = %failed, error = %error, reason = why.as_str(), "attempt failed; retrying on another endpoint");
        let second = match b.pick(Some(failed)) {
            Pick::Endpoint(f) => f,
            _ => return Err(SendError::Client(error)),
        };
        let Some(ep) = second.member().http_endpoint(h1) else {
            return Err(SendError::Client(error));
        };
        b.retried(why);
        let start = Instant::now();
        match ep.try_request(req).await {
            Ok(rsp) => {
                observe(second.member(), start, &rsp);
                b.record(second.member(), !rsp.status().is_server_error(), breaker);
                Ok((rsp, Some(second)))
            }
            Err(u) => {
                b.attempt_failed(second.member());
                b.record(second.member(), false, breaker);
                Err(SendError::Client(u.error))
            }
        }
    }

    async fn forward(
        &self,
        req: Request<BoxBody>,
        h1: bool,
    ) -> Result<(Response<PooledBody>, Option<InFlight>), SendError> {
        let client = match &self.h1_client {
            Some(c) if h1 => c,
            _ => &self.client,
        };
        match client.request(req).await {
            Ok(rsp) => Ok((rsp, None)),
            Err(e) => Err(SendError::Client(e)),
        }
    }

    /// A proxy-made answer, counted and logged; `grpc`: the request is gRPC, so the answer
    /// is too (the cause's `grpc-status` in a trailers-only response).
    #[allow(clippy::too_many_arguments)]
    fn error_response(
        &self,
        authority: Arc<AuthorityMetrics>,
        cause: Cause,
        detail: &str,
        start: Instant,
        grpc: bool,
        mut draft: Option<Box<Draft>>,
    ) -> Response<BoxBody> {
        self.metrics.error(self.direction, cause.as_str());
        tracing::info!(direction = %self.direction, target = %self.target, cause = cause.as_str(), detail, "proxy answered with an error");
        let rsp = cause.response_for(grpc, detail);
        if let Some(d) = draft.as_mut() {
            d.event.error = Some(cause);
            d.event.response_bytes = http_body::Body::size_hint(rsp.body()).exact().unwrap_or(0);
        }
        Recorder {
            metrics: authority,
            status: rsp.status().as_u16(),
            grpc_status: grpc.then(|| cause.grpc_status()),
            latency: start.elapsed(),
            failed: true,
            in_flight: None,
            draft,
        }
        .record();
        rsp
    }
}

/// Proxies one request to the connection's destination.
async fn proxy(ctx: &ConnCtx, mut req: Request<Incoming>) -> Response<BoxBody> {
    let start = Instant::now();
    let grpc = error::is_grpc(req.headers());
    let mut draft = ctx
        .observe
        .begin(ctx.direction, ctx.peer, ctx.client_id.as_ref(), &mut req);
    let destination = ctx.service_destination().await;
    let routed = match ctx.authority(&req, destination) {
        Ok(a) => a,
        Err(cause) => {
            let host = req
                .headers()
                .get(header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
                .unwrap_or_default();
            return ctx.error_response(
                ctx.metrics
                    .authority(ctx.direction, "unknown", ctx.client_label()),
                cause,
                &format!("invalid Host header {host:?}"),
                start,
                grpc,
                draft,
            );
        }
    };
    let Routed {
        authority,
        metrics: label,
        balancer,
        policy,
        fresh,
    } = routed;
    label.request();
    if let Some(d) = draft.as_mut() {
        d.event.authority = authority.to_string();
    }
    if let Some(why) = ctx.mesh.as_ref().and_then(|m| m.certificate_problem()) {
        return ctx.error_response(label, Cause::IdentityUnavailable, &why, start, grpc, draft);
    }
    // Inbound authorization, on the port's current policy (a change applies to the next
    // request of every open connection).
    if let Some(az) = &ctx.authz {
        use crate::authz::{decide, Decision};
        let policy = az.policy();
        let client = az.client();
        let d = decide::request(&policy, &client, req.method(), req.uri(), req.headers());
        az.record(&policy, &d, "request");
        if let (Some(r), Some(dr)) = (d.route(), draft.as_mut()) {
            dr.event.route = Some(r.clone());
        }
        match d {
            Decision::Allow { .. } | Decision::AuditDeny { .. } => {}
            Decision::Deny { route } => {
                let detail = decide::deny_detail(&policy, route, &client);
                return ctx.error_response(label, Cause::Unauthorized, &detail, start, grpc, draft);
            }
            Decision::NoRoute => {
                let detail = format!(
                    "{}: no route of the server matches {} {}",
                    policy.server,
                    req.method(),
                    req.uri().path()
                );
                return ctx.error_response(label, Cause::NoRoute, &detail, start, grpc, draft);
            }
        }
    }

    let size = headers_size(req.headers());
    if size > ctx.limits.max_header_bytes {
        let detail = format!(
            "request headers are {size} bytes, limit is {}",
            ctx.limits.max_header_bytes
        );
        return ctx.error_response(label, Cause::HeaderTooLarge, &detail, start, grpc, draft);
    }

    let upgrade = is_upgrade(&req);
    strip_hop_by_hop(req.headers_mut(), upgrade);
    // The proxy answers `Expect: 100-continue` itself (hyper sends 100 when the body is first
    // read, i.e. once the upstream connection is ready), so the upstream never waits for it.
    req.headers_mut().remove(header::EXPECT);

    // The request keeps the form it arrived in; the endpoint's client puts it in the form its
    // protocol needs (origin form and `Host` for HTTP/1.1, `:authority` for HTTP/2). An
    // HTTP/1.0 client may omit `Host`: it gets the authority routed on.
    if !ctx.h2 && !req.headers().contains_key(header::HOST) {
        match HeaderValue::from_str(authority.as_str()) {
            Ok(v) => {
                req.headers_mut().insert(header::HOST, v);
            }
            Err(e) => {
                return ctx.error_response(
                    label,
                    Cause::BadRequest,
                    &e.to_string(),
                    start,
                    grpc,
                    draft,
                )
            }
        }
    }
    let mut h1 = upgrade;
    if ctx.direction == Direction::Inbound {
        // Only a verified peer proxy may say how to hand the request on, or who the client is.
        let orig_proto = req.headers_mut().remove(ORIG_PROTO);
        req.headers_mut().remove(CLIENT_ID);
        if let Some(id) = &ctx.client_id {
            h1 |= orig_proto.is_some_and(|p| p.as_bytes().starts_with(b"HTTP/1"));
            if let Ok(v) = HeaderValue::from_str(id) {
                req.headers_mut().insert(CLIENT_ID, v);
            }
        }
    }
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let mut req = req.map(|b| b.map_err(BoxError::from).boxed());

    // The outbound policy: route → filters here, then timeout → retry → balance → breaker →
    // endpoint in `send_planned` (see `outbound`).
    let mut plan = match (policy, &ctx.router) {
        (Some(mut rx), Some(router)) => {
            if fresh {
                rx = router
                    .policies()
                    .ready(&balance::http_target(&authority))
                    .await;
            }
            let policy = rx.borrow().clone();
            let (mut parts, body) = req.into_parts();
            let planned = ctx.plan(&policy, &mut parts, balancer);
            req = Request::from_parts(parts, body);
            match planned {
                Ok(p) => p,
                Err(outbound::Early::Error(cause, detail)) => {
                    return ctx.error_response(label, cause, &detail, start, grpc, draft)
                }
                Err(outbound::Early::Redirect(rsp)) => {
                    Recorder {
                        metrics: label,
                        status: rsp.status().as_u16(),
                        grpc_status: None,
                        latency: start.elapsed(),
                        failed: false,
                        in_flight: None,
                        draft,
                    }
                    .record();
                    return *rsp;
                }
            }
        }
        (_, _) => outbound::Plan::direct(balancer),
    };
    // RequestMirror copies start here, sent beside the request (never an upgrade).
    if !plan.mirrors.is_empty() && !h1 {
        req = mirror::start(std::mem::take(&mut plan.mirrors), req);
    }
    let sent = ctx.send_planned(&plan, req, h1).await;
    if let Some(d) = draft.as_mut() {
        if let Some(r) = plan.route_label() {
            d.event.route = Some(r.clone());
        }
        d.event.retries = plan.retries();
        match &sent {
            Ok((_, Some(f))) => {
                d.event.endpoint = Some(f.member().addr);
                d.event.server_id = f.member().mesh.as_ref().map(|m| m.id.clone());
            }
            Ok((_, None)) => d.event.endpoint = Some(ctx.target),
            // The endpoint the last attempt failed on; the original destination without
            // discovery.
            Err(SendError::Client(e)) => {
                d.event.endpoint = outbound::client_error_addr(e)
                    .or(plan.balancer.is_none().then_some(ctx.target));
            }
            Err(_) => {}
        }
    }
    let (mut rsp, in_flight) = match sent {
        Ok(r) => r,
        Err(e) => {
            let (cause, detail) = match e {
                SendError::Client(e) => (
                    cause_of(&e),
                    format!("{} ({})", ctx.target, error_chain(&e)),
                ),
                SendError::NoEndpoints => (
                    Cause::NoEndpoints,
                    format!("{authority} has no ready endpoints"),
                ),
                SendError::Timeout(t) => (
                    Cause::RequestTimeout,
                    format!("{authority}: no answer within the request timeout of {t:?}"),
                ),
                SendError::AttemptTimeout(t) => (
                    Cause::RequestTimeout,
                    format!("{authority}: no answer within the backend request timeout of {t:?}"),
                ),
                SendError::Overloaded => (
                    Cause::Overloaded,
                    format!("every endpoint of {authority} is at its concurrency limit and the pending-request limit is reached"),
                ),
            };
            plan.record(ctx, true);
            return ctx.error_response(label, cause, &detail, start, grpc, draft);
        }
    };
    let latency = start.elapsed();
    plan.filter_response(rsp.headers_mut());

    if rsp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut rsp);
            tokio::spawn(async move {
                match tokio::try_join!(down, up) {
                    Ok((d, u)) => {
                        let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                        if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
                            tracing::debug!(error = %e, "upgraded connection ended with an error");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
        }
    } else {
        strip_hop_by_hop(rsp.headers_mut(), false);
    }

    let grpc_status = body::grpc_status(rsp.headers());
    plan.record(
        ctx,
        rsp.status().is_server_error() || grpc_status.is_some_and(|c| c != 0),
    );
    let recorder = Recorder {
        metrics: label,
        status: rsp.status().as_u16(),
        grpc_status,
        latency,
        failed: false,
        in_flight,
        draft,
    };
    rsp.map(|b| Observed::new(b, recorder).boxed())
}

/// Feeds an endpoint's latency estimate with one answer: its service time, from the request
/// written to the response head (a new connection's dial and handshake are not its latency).
fn observe(member: &balance::Member, start: Instant, rsp: &Response<PooledBody>) {
    member.observe_answer(start.elapsed(), rsp.body().connect_time());
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        h.insert("x-end", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-end"));

        let mut g = HeaderMap::new();
        g.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut g, false);
        assert_eq!(g[header::TE], "trailers");
    }

    #[test]
    fn upgrade_keeps_upgrade_headers() {
        let req = Request::builder()
            .header(header::CONNECTION, "keep-alive, Upgrade")
            .header(header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert!(is_upgrade(&req));
        let mut h = req.headers().clone();
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn authority_sources() {
        let t: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let r = Request::builder()
            .uri("/")
            .header("host", "web.ns:8080")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&r, t).unwrap().as_str(), "web.ns:8080");
        let r = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(authority_of(&r, t).unwrap().as_str(), "10.0.0.1:80");
        let r = Request::builder()
            .uri("/")
            .header("host", "bad host")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&r, t), Err(Cause::BadAuthority));
        let r = Request::builder()
            .uri("http://h2.example/x")
            .body(())
            .unwrap();
        assert_eq!(authority_of(&r, t).unwrap().as_str(), "h2.example");
    }
}
