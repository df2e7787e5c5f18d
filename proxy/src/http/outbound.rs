//! An outbound request's policy, in the one order DESIGN.md writes down:
//!
//! ```text
//! route → filters → timeout → retry → balance → breaker → endpoint
//! ```
//!
//! - **route** and **filters** ([`ConnCtx::plan`]): the service's ClientPolicy
//!   ([`crate::route`]) picks the rule (or answers 404 `no-route`), its request filters run
//!   (or it answers with a redirect), a backend is drawn by weight (an invalid one answers 500
//!   `invalid-backend`) and its own filters run.
//! - **timeout** ([`ConnCtx::send_planned`]): the rule's `timeouts.request` (else the
//!   BackendPolicy's request timeout) bounds everything below, retries included: 504
//!   `request-timeout` (gRPC: DEADLINE_EXCEEDED).
//! - **retry** ([`ConnCtx::attempts`]): the rule's retry policy decides from the status, the
//!   gRPC status (from the head, or from the trailers, which are awaited up to the retry
//!   buffer's size) or the failure; the service's retry budget must allow it; the request is
//!   replayed from [`crate::resilience::replay`] (bodies up to 64 KiB); each retry goes to
//!   another endpoint when one exists and waits its backoff; `timeouts.backendRequest` bounds
//!   each attempt.
//! - **balance**, **breaker**, **endpoint**: [`ConnCtx::send`] (p2c skipping ejected
//!   endpoints, the breaker fed by every answer, the failover of requests that never reached
//!   an application).
//!
//! Written as plain async functions rather than a stack of tower layers, and not for speed:
//! `cargo bench -p weft-proxy --bench layers` puts tower's `Timeout` + `Retry` (with a
//! `tower::retry::Policy` over the same budget) at 531 ns per request against 520 ns for
//! these functions (1.02×, median of 5 interleaved rounds of 300,000 requests, 2026-12-05),
//! so either would do. The reason is the state the steps share: the attempt borrows the
//! connection's context, and a retry needs the endpoint to avoid, the replayable request
//! ([`crate::resilience::Resend`], whose copy exists only once the previous attempt dropped
//! its body) and the matched rule; as layers these would travel in request extensions and a
//! `'static` clone of the inner service per request, for a stack used in one place. What
//! tower gives is used: the budget is tower's `TpsBudget`
//! ([`crate::resilience::retry::Budget`]), and the retry decision has the shape of
//! `tower::retry::Policy` (a pure function of the outcome and the attempt count).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::client::{ClientError, PooledBody};
use super::{BoxBody, BoxError, Cause, ConnCtx, SendError};
use crate::balance::{self, Balancer, InFlight};
use crate::metrics::{
    MirrorLabels, RouteBackendLabels, RouteLabel, RouteReasonLabels, RouteResultLabels,
};
use crate::resilience::breaker::BreakerConfig;
use crate::resilience::replay::DEFAULT_CAP;
use crate::resilience::retry::{Budget, Outcome, RetryConfig};
use crate::resilience::{self, Resend};
use crate::route::filters::{self, Action};
use crate::route::matching;
use crate::route::policy::{BackendKind, Filter, Policy};

/// What the policy decided for one request before it is sent.
pub(super) struct Plan {
    /// Where it goes; `None`: to the original destination (no discovery).
    pub balancer: Option<Arc<Balancer>>,
    pub request_timeout: Option<Duration>,
    /// The backend's circuit breaker and concurrency limits.
    breaker: BreakerConfig,
    /// The matched rule, when a route matched.
    rule: Option<Rule>,
    /// RequestMirror copies this request makes (taken by the caller).
    pub mirrors: Vec<super::mirror::Mirrored>,
    /// Retries sent after the first attempt (for the access log, taps and traces).
    retries: std::sync::atomic::AtomicU32,
}

/// A matched route rule and its chosen backend.
struct Rule {
    policy: Arc<Policy>,
    route: usize,
    backend: usize,
    label: Arc<str>,
    /// The service's retry budget, when the rule retries.
    budget: Option<Arc<Budget>>,
}

impl Rule {
    fn route(&self) -> &crate::route::policy::Route {
        &self.policy.routes[self.route]
    }
}

/// The policy answers the request itself.
pub(super) enum Early {
    Error(Cause, String),
    Redirect(Box<Response<BoxBody>>),
}

impl Plan {
    /// No policy: the authority's balancer (or the original destination), nothing else.
    pub fn direct(balancer: Option<Arc<Balancer>>) -> Self {
        Plan {
            balancer,
            request_timeout: None,
            breaker: BreakerConfig::default(),
            rule: None,
            mirrors: Vec::new(),
            retries: Default::default(),
        }
    }

    /// The matched rule's metrics label (`kind/namespace/name/rule`), when a route matched.
    pub fn route_label(&self) -> Option<&Arc<str>> {
        self.rule.as_ref().map(|r| &r.label)
    }

    /// Retries sent after the first attempt.
    pub fn retries(&self) -> u32 {
        self.retries.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Applies the matched rule's and backend's response filters.
    pub fn filter_response(&self, headers: &mut http::HeaderMap) {
        if let Some(r) = &self.rule {
            let route = r.route();
            filters::apply_response(&route.filters, headers);
            if let Some(b) = route.backends.get(r.backend) {
                filters::apply_response(&b.filters, headers);
            }
        }
    }

    /// Counts the response of a routed request.
    pub fn record(&self, ctx: &ConnCtx, failed: bool) {
        if let Some(r) = &self.rule {
            let counters = r.route().cache.responses.get_or_init(|| {
                let c = |classification| {
                    ctx.metrics
                        .routes
                        .responses
                        .get_or_create(&RouteResultLabels {
                            route: r.label.clone(),
                            classification,
                        })
                        .clone()
                };
                [c("success"), c("failure")]
            });
            counters[usize::from(failed)].inc();
        }
    }
}

/// The body of an answer: the pooled connection's own, or rebuilt after its gRPC trailers
/// were read for a retry decision. An enum rather than a box, so the common case allocates
/// nothing.
pub(super) enum UpBody {
    Pooled(PooledBody),
    Boxed(BoxBody),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::Pooled(b) => Pin::new(b).poll_frame(cx),
            UpBody::Boxed(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Pooled(b) => b.is_end_stream(),
            UpBody::Boxed(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Pooled(b) => b.size_hint(),
            UpBody::Boxed(b) => b.size_hint(),
        }
    }
}

type Sent = Result<(Response<UpBody>, Option<InFlight>), SendError>;

impl ConnCtx {
    /// Route → filters: what `policy` says about the request whose head is `parts` (its
    /// request filters are applied here). `authority`: the balancer of the request's
    /// authority, for the default route.
    pub(super) fn plan(
        &self,
        policy: &Arc<Policy>,
        parts: &mut http::request::Parts,
        authority: Option<Arc<Balancer>>,
    ) -> Result<Plan, Early> {
        let (Some(service), Some(router)) = (&policy.service, &self.router) else {
            return Ok(Plan::direct(authority));
        };
        let (route, prefix) =
            match matching::route(policy, &parts.method, &parts.uri, &parts.headers) {
                matching::Outcome::Default => {
                    if let Some(b) = &authority {
                        b.configure(
                            policy.settings.connect_timeout,
                            policy.settings.idle_timeout,
                        );
                    }
                    return Ok(Plan {
                        balancer: authority,
                        request_timeout: policy.settings.request_timeout,
                        breaker: policy.settings.breaker,
                        rule: None,
                        mirrors: Vec::new(),
                        retries: Default::default(),
                    });
                }
                matching::Outcome::NoRoute => {
                    return Err(Early::Error(
                        Cause::NoRoute,
                        format!(
                            "no route of {}/{}:{} matches {} {}",
                            service.namespace,
                            service.name,
                            service.port,
                            parts.method,
                            parts.uri.path()
                        ),
                    ))
                }
                matching::Outcome::Matched { route, prefix } => (route, prefix),
            };
        let index = policy
            .routes
            .iter()
            .position(|r| std::ptr::eq(r, route))
            .unwrap_or_default();
        let label = route.label.clone();
        let redirect = match filters::apply_request(
            &route.filters,
            prefix,
            &mut parts.uri,
            &mut parts.headers,
        ) {
            Action::Forward => None,
            Action::Redirect(r) => Some(r),
        };
        if let Some(r) = redirect {
            return Err(Early::Redirect(Box::new(r.response(empty()))));
        }
        let protocol = if self.h2 {
            balance::Protocol::Http2
        } else {
            balance::Protocol::Http1
        };
        let mirrors = self.mirrors(route, router, protocol);
        let backend = crate::route::backend::pick_random(&route.backends);
        let picked = backend
            .and_then(|b| route.backends.iter().position(|x| std::ptr::eq(x, b)))
            .unwrap_or_default();
        let requests = |backend: Arc<str>| {
            self.metrics
                .routes
                .requests
                .get_or_create(&RouteBackendLabels {
                    route: label.clone(),
                    backend,
                })
                .clone()
        };
        let backend = match backend {
            None => {
                requests(Arc::from("invalid")).inc();
                return Err(Early::Error(
                    Cause::InvalidBackend,
                    format!("route {label} has no backend with a weight"),
                ));
            }
            Some(b) => b,
        };
        backend
            .cache
            .requests
            .get_or_init(|| {
                requests(match &backend.kind {
                    BackendKind::Service(t) => t.clone(),
                    BackendKind::Invalid(_) => Arc::from("invalid"),
                })
            })
            .inc();
        let target = match &backend.kind {
            BackendKind::Invalid(why) => {
                return Err(Early::Error(
                    Cause::InvalidBackend,
                    format!("route {label}: {why}"),
                ))
            }
            BackendKind::Service(t) => t,
        };
        if let Action::Redirect(r) =
            filters::apply_request(&backend.filters, prefix, &mut parts.uri, &mut parts.headers)
        {
            return Err(Early::Redirect(Box::new(r.response(empty()))));
        }
        let budget = route.retry.is_some().then(|| {
            route
                .cache
                .budget
                .get_or_init(|| {
                    let key = format!("{}/{}:{}", service.namespace, service.name, service.port);
                    router.budget(&key, &policy.settings.budget)
                })
                .clone()
        });
        let balancer = backend.cache.balancers[usize::from(protocol == balance::Protocol::Http2)]
            .get_or_init(|| router.balancer(target, protocol))
            .clone();
        if let Some(b) = &balancer {
            b.configure(
                backend.settings.connect_timeout,
                backend.settings.idle_timeout,
            );
        }
        Ok(Plan {
            balancer,
            request_timeout: route.request_timeout,
            breaker: backend.settings.breaker,
            rule: Some(Rule {
                policy: policy.clone(),
                route: index,
                backend: picked,
                label,
                budget,
            }),
            mirrors,
            retries: Default::default(),
        })
    }

    /// The RequestMirror copies `route` makes of this request (sampled by their share).
    fn mirrors(
        &self,
        route: &crate::route::policy::Route,
        router: &super::Router,
        protocol: balance::Protocol,
    ) -> Vec<super::mirror::Mirrored> {
        let mut out = Vec::new();
        for f in &route.filters {
            let Filter::Mirror(m) = f else { continue };
            let BackendKind::Service(target) = &m.backend.kind else {
                continue;
            };
            if !m.samples(fastrand::f64()) {
                continue;
            }
            let Some(balancer) = m.backend.cache.balancers
                [usize::from(protocol == balance::Protocol::Http2)]
            .get_or_init(|| router.balancer(target, protocol))
            .clone() else {
                continue;
            };
            let counters = m
                .counters
                .get_or_init(|| {
                    let c = |result| {
                        self.metrics
                            .routes
                            .mirrors
                            .get_or_create(&MirrorLabels {
                                route: route.label.clone(),
                                backend: target.clone(),
                                result,
                            })
                            .clone()
                    };
                    [c("answered"), c("failed"), c("skipped")]
                })
                .clone();
            out.push(super::mirror::Mirrored { balancer, counters });
        }
        out
    }

    /// Timeout → retry → balance → breaker → endpoint.
    pub(super) async fn send_planned(&self, plan: &Plan, req: Request<BoxBody>, h1: bool) -> Sent {
        let work = self.attempts(plan, req, h1);
        match plan.request_timeout {
            None => work.await,
            Some(t) => match tokio::time::timeout(t, work).await {
                Ok(sent) => sent,
                Err(_) => {
                    self.count_timeout(plan, "request");
                    Err(SendError::Timeout(t))
                }
            },
        }
    }

    fn count_timeout(&self, plan: &Plan, kind: &'static str) {
        if let Some(r) = &plan.rule {
            self.metrics
                .routes
                .timeouts
                .get_or_create(&RouteReasonLabels {
                    route: r.label.clone(),
                    reason: kind,
                })
                .inc();
        }
    }

    /// Retry: attempts until one answers in a way the rule does not retry, the rule's
    /// attempts or the budget run out, or the request cannot be replayed.
    async fn attempts(&self, plan: &Plan, mut req: Request<BoxBody>, h1: bool) -> Sent {
        let rule = plan.rule.as_ref();
        let per_try = rule.and_then(|r| r.route().backend_request_timeout);
        let retry = rule
            .and_then(|r| r.route().retry.as_ref())
            .filter(|r| r.attempts > 0 && !h1 && plan.balancer.is_some());
        let (Some(retry), Some(rule), Some(budget)) =
            (retry, rule, rule.and_then(|r| r.budget.as_ref()))
        else {
            return self
                .attempt(plan, req, h1, None, None, per_try)
                .await
                .map(|(r, f)| (r.map(UpBody::Pooled), f));
        };
        budget.deposit();
        let resend = Resend::prepare(&mut req, DEFAULT_CAP);
        let mut done = 0u32;
        let mut exclude = None;
        loop {
            let method = req.method().clone();
            let sent = self
                .attempt(plan, req, h1, exclude, Some(&resend), per_try)
                .await;
            let (sent, outcome, endpoint) = classify(sent, &method, retry).await;
            let Some(outcome) = outcome.filter(|o| retry.retries(*o, done)) else {
                return sent;
            };
            if !budget.withdraw() {
                self.metrics
                    .routes
                    .budget_exhausted
                    .get_or_create(&RouteLabel {
                        route: rule.label.clone(),
                    })
                    .inc();
                return sent;
            }
            // The copy needs the body back from the last attempt; the connection's task may
            // drop it a moment after the answer, so give it one turn.
            let mut whole = resend.sent_whole();
            let next = match resend.request() {
                Some(r) => r,
                None => {
                    tokio::task::yield_now().await;
                    whole = resend.sent_whole();
                    match resend.request() {
                        Some(r) => r,
                        None => return sent,
                    }
                }
            };
            // Read what is left of the failed answer, so its HTTP/1.1 connection goes back to
            // the pool instead of being closed and dialled again for the retry. Only when the
            // attempt wrote the whole request: a server that answered before the body reached
            // it closes the connection after its answer, and the retry must not be sent on it.
            // (Checked before `next` takes the body.)
            match sent {
                Ok((rsp, _)) if whole => drain(rsp.into_body()).await,
                other => drop(other),
            }
            self.metrics
                .routes
                .retries
                .get_or_create(&RouteReasonLabels {
                    route: rule.label.clone(),
                    reason: reason(outcome),
                })
                .inc();
            let wait = retry.backoff(done, fastrand::f64());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            done += 1;
            plan.retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            exclude = endpoint;
            req = next;
        }
    }

    /// One attempt, bounded by the per-try timeout.
    async fn attempt(
        &self,
        plan: &Plan,
        req: Request<BoxBody>,
        h1: bool,
        exclude: Option<SocketAddr>,
        resend: Option<&Resend>,
        per_try: Option<Duration>,
    ) -> Result<(Response<PooledBody>, Option<InFlight>), SendError> {
        let send = self.send(
            plan.balancer.as_ref(),
            req,
            h1,
            exclude,
            resend,
            &plan.breaker,
        );
        match per_try {
            None => send.await,
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(sent) => sent,
                Err(_) => {
                    self.count_timeout(plan, "backend-request");
                    Err(SendError::AttemptTimeout(t))
                }
            },
        }
    }
}

/// Reads a discarded answer's body to its end, up to [`DEFAULT_CAP`] bytes and 100 ms.
async fn drain(mut body: UpBody) {
    let read = async {
        let mut size = 0usize;
        while let Some(Ok(f)) = body.frame().await {
            size += f.data_ref().map_or(0, |d| d.len());
            if size > DEFAULT_CAP {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_millis(100), read).await;
}

fn empty() -> BoxBody {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

fn reason(o: Outcome) -> &'static str {
    match o {
        Outcome::Answered { grpc: Some(_), .. } => "grpc-status",
        Outcome::Answered { .. } => "status",
        Outcome::Failed => "failed",
        Outcome::TimedOut => "timeout",
    }
}

/// What an attempt ended with, for the retry decision, and the endpoint it went to. A gRPC
/// answer whose status is in its trailers is read up to the retry buffer's size to find it
/// (when the rule retries gRPC codes at all); its frames are handed on unchanged.
async fn classify(
    sent: Result<(Response<PooledBody>, Option<InFlight>), SendError>,
    method: &http::Method,
    retry: &RetryConfig,
) -> (Sent, Option<Outcome>, Option<SocketAddr>) {
    match sent {
        Ok((rsp, in_flight)) => {
            let endpoint = in_flight.as_ref().map(|f| f.member().addr);
            let status = rsp.status().as_u16();
            let mut grpc = super::body::grpc_status(rsp.headers());
            let mut rsp = rsp.map(UpBody::Pooled);
            if grpc.is_none() && retry.grpc_codes != 0 && super::error::is_grpc(rsp.headers()) {
                let (r, code) = grpc_trailers(rsp).await;
                rsp = r;
                grpc = code;
            }
            let outcome = Outcome::Answered { status, grpc };
            (Ok((rsp, in_flight)), Some(outcome), endpoint)
        }
        Err(SendError::Client(e)) => {
            let endpoint = client_error_addr(&e);
            let repeatable = match &e {
                ClientError::Request { .. } => {
                    resilience::again(resilience::failure_of(&e), method).is_some()
                }
                // Never reached the endpoint (no connection could be made).
                _ => true,
            };
            let outcome = repeatable.then_some(Outcome::Failed);
            (Err(SendError::Client(e)), outcome, endpoint)
        }
        Err(SendError::AttemptTimeout(t)) => (
            Err(SendError::AttemptTimeout(t)),
            Some(Outcome::TimedOut),
            None,
        ),
        Err(e) => (Err(e), None, None),
    }
}

pub(super) fn client_error_addr(e: &ClientError) -> Option<SocketAddr> {
    Some(match e {
        ClientError::Connect(c) => c.addr,
        ClientError::Tls { addr, .. }
        | ClientError::Handshake { addr, .. }
        | ClientError::Request { addr, .. } => *addr,
    })
}

/// Reads a gRPC answer's body up to [`DEFAULT_CAP`] bytes looking for its trailers: the
/// answer again (same frames, then the rest of the body) and the `grpc-status` found.
async fn grpc_trailers(rsp: Response<UpBody>) -> (Response<UpBody>, Option<u32>) {
    let (parts, mut body) = rsp.into_parts();
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = Vec::new();
    let mut size = 0usize;
    let mut status = None;
    let mut ended = false;
    while size <= DEFAULT_CAP {
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(Err(e)) => {
                frames.push(Err(e));
                ended = true;
                break;
            }
            Some(Ok(f)) => {
                if let Some(t) = f.trailers_ref() {
                    status = super::body::grpc_status(t);
                }
                if let Some(d) = f.data_ref() {
                    size += d.len();
                }
                frames.push(Ok(f));
            }
        }
    }
    let head = futures_util::stream::iter(frames);
    let rebuilt: BoxBody = if ended {
        http_body_util::StreamBody::new(head).boxed()
    } else {
        let rest = http_body_util::BodyStream::new(body);
        http_body_util::StreamBody::new(futures_util::StreamExt::chain(head, rest)).boxed()
    };
    (Response::from_parts(parts, UpBody::Boxed(rebuilt)), status)
}
