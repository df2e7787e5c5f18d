//! The proxy's compiled form of an `OutboundPolicy`: what the controller sent, checked once
//! and turned into the types the request path uses (regexes compiled, header names parsed,
//! durations converted, defaults applied), so no request parses or validates anything.
//!
//! A mistake in one route never costs the others: a route whose conversion fails (a bad
//! regex, header name or value, redirect status, path) is dropped, with its matches, and the
//! problem is returned beside the policy ([`Compiled::problems`]) for the caller to log once.
//! Requests that would have matched it fall to the next match in precedence order, or to 404
//! `no-route`, as if the rule were not there (the Gateway API's "partially invalid" route).
//! A bad [`BackendSettings`] field takes its default, also with a problem.
//!
//! Defaults (DESIGN.md): retry budget 20 % of requests plus 10 retries/s over 10 s; breaker
//! ejects after 7 consecutive failures, for 1 s doubling to 60 s, plus up to 10 % jitter.
//! The proto has no field presence for scalars, so it is read literally: a zero scalar whose
//! comment gives only a default takes the default (`retry_ratio`, `min_retries_per_second`,
//! `jitter`); one whose comment gives zero a meaning keeps that meaning
//! (`consecutive_failures` 0 disables ejection; `max_concurrent_requests` and
//! `max_pending_requests` 0 mean no limit). An unset message or `Duration` takes its
//! defaults.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;

use crate::balance::Balancer;
use crate::resilience::retry::Budget;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use regex::bytes::{Regex, RegexBuilder};
use weft_proto::destination as pb;
use weft_proto::prost_types;

/// Compiled size bound of one regex. The regex crate's own default (10 MiB) is meant for one
/// program; a policy may hold hundreds of regexes in every proxy of a cluster.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The outbound policy of one service port, ready for the request path.
#[derive(Debug)]
pub struct Policy {
    /// The service the target names; `None`: not a known service port (a pod IP, an unknown
    /// name, or a controller without ClientPolicy): a connection to it is routed by
    /// authority, default settings.
    pub service: Option<ServiceRef>,
    /// The port is opaque: TCP only, no protocol detection.
    pub opaque: bool,
    /// Routes that compiled; [`Match::route`] indexes this.
    pub routes: Vec<Route>,
    /// In precedence order: the first that matches a request picks its route.
    pub matches: Vec<Match>,
    /// The controller sent routes (some may have been dropped): a request no match takes
    /// gets 404 `no-route` rather than the default route.
    pub routed: bool,
    /// The service's BackendPolicy or the defaults.
    pub settings: Arc<BackendSettings>,
    /// What the controller built this from ("httproute/ns/a,..." or "default"), for logs.
    pub source: Arc<str>,
}

impl Default for Policy {
    /// No service, no routes, default settings: what a proxy uses before (or without) an answer.
    fn default() -> Self {
        Self {
            service: None,
            opaque: false,
            routes: Vec::new(),
            matches: Vec::new(),
            routed: false,
            settings: Arc::default(),
            source: Arc::from("default"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub port: u16,
}

/// One rule of an HTTPRoute or GRPCRoute.
#[derive(Debug)]
pub struct Route {
    /// `"<kind>/<ns>/<name>/<rule>"`, the `route` metrics label.
    pub label: Arc<str>,
    /// The rule's filters, in order.
    pub filters: Vec<Filter>,
    /// Weighted backends ([`super::backend::pick`]); empty: 500.
    pub backends: Vec<Backend>,
    /// The whole request, retries included: the route's `timeouts.request`, else the
    /// service's default request timeout; `None`: no timeout (a zero duration disables it,
    /// as the Gateway API says).
    pub request_timeout: Option<Duration>,
    /// Each attempt (`timeouts.backendRequest`); `None`: no per-attempt timeout.
    pub backend_request_timeout: Option<Duration>,
    /// `None`: not retried (beyond the failover of requests that never reached an endpoint).
    pub retry: Option<Retry>,
    /// What the request path looks up once per policy rather than per request.
    pub cache: RouteCache,
}

/// A rule's handles, made on first use: its service's retry budget and its response
/// counters. They live as long as this compiled policy; a new policy looks them up again.
#[derive(Debug, Default)]
pub struct RouteCache {
    pub budget: OnceLock<Arc<Budget>>,
    /// `weft_route_responses_total{classification="success"|"failure"}`.
    pub responses: OnceLock<[Counter; 2]>,
}

/// A backend's handles, made on first use: its balancer per protocol (HTTP/1, HTTP/2) and its
/// request counter.
#[derive(Debug, Default)]
pub struct BackendCache {
    pub balancers: [OnceLock<Option<Arc<Balancer>>>; 2],
    /// `weft_route_requests_total{backend}`.
    pub requests: OnceLock<Counter>,
}

/// One entry of [`Policy::matches`]: all its conditions must hold (AND).
#[derive(Debug)]
pub struct Match {
    /// Index into [`Policy::routes`].
    pub route: usize,
    pub path: PathMatch,
    /// At most one per header name (the first the controller sent, as the Gateway API says).
    pub headers: Vec<HeaderMatch>,
    /// At most one per parameter name (the first the controller sent).
    pub query_params: Vec<QueryParamMatch>,
    /// `None`: any method.
    pub method: Option<Method>,
}

/// How a request's path (without the query) is matched.
#[derive(Debug)]
pub enum PathMatch {
    /// The whole path, byte for byte.
    Exact(Box<str>),
    /// Whole segments: `/foo` matches `/foo`, `/foo/`, `/foo/bar`, not `/foobar`. Stored
    /// without a trailing slash, except the root `/`, which matches every path. An unset
    /// path match compiles to `Prefix("/")`.
    Prefix(Box<str>),
    /// Matched against the whole path (anchored).
    Regex(Regex),
}

#[derive(Debug)]
pub struct HeaderMatch {
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Debug)]
pub struct QueryParamMatch {
    /// Compared with the percent-decoded parameter name, exactly.
    pub name: Box<str>,
    pub value: ValueMatch,
}

/// How a header or query-parameter value is matched.
#[derive(Debug)]
pub enum ValueMatch {
    /// Byte for byte (case-sensitive).
    Exact(Box<[u8]>),
    /// Matched against the whole value (anchored).
    Regex(Regex),
}

/// A route or backend filter.
#[derive(Debug)]
pub enum Filter {
    RequestHeaders(HeaderModifier),
    ResponseHeaders(HeaderModifier),
    Redirect(Redirect),
    Rewrite(Rewrite),
    /// Rule filters only: the request, as the rule's other filters leave it, is copied to
    /// another service too (`http::mirror`).
    Mirror(Mirror),
}

/// A RequestMirror: `numerator / denominator` of the requests are copied to `backend`.
#[derive(Debug)]
pub struct Mirror {
    /// Weight and filters unused.
    pub backend: Backend,
    pub numerator: u32,
    pub denominator: u32,
    /// `weft_route_mirrors_total{result="answered"|"failed"|"skipped"}`, made on first use.
    pub counters: OnceLock<[Counter; 3]>,
}

impl Mirror {
    /// Whether this request is mirrored, given a uniform `draw` in [0, 1).
    pub fn samples(&self, draw: f64) -> bool {
        self.denominator > 0 && draw * f64::from(self.denominator) < f64::from(self.numerator)
    }
}

/// Header edits, applied set, then add, then remove. Names are lower case.
#[derive(Debug, Default)]
pub struct HeaderModifier {
    /// Replace every value of the name with this one.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Append a value (keeping existing ones).
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

/// A request answered with a redirect instead of being sent.
#[derive(Debug)]
pub struct Redirect {
    /// `None`: the request's.
    pub scheme: Option<RedirectScheme>,
    /// `None`: the request's host.
    pub hostname: Option<Box<str>>,
    /// `None`: the request's port, or the scheme's default when the scheme changes.
    pub port: Option<u16>,
    /// `None`: the request's path.
    pub path: Option<PathModifier>,
    /// 301, 302, 303, 307 or 308.
    pub status: StatusCode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectScheme {
    Http,
    Https,
}

impl RedirectScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            RedirectScheme::Http => "http",
            RedirectScheme::Https => "https",
        }
    }
}

/// The request is sent with another authority or path.
#[derive(Debug)]
pub struct Rewrite {
    /// Replaces the authority and `Host` (no port); `None`: kept.
    pub hostname: Option<HeaderValue>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PathModifier {
    /// ReplaceFullPath (the query is kept).
    Full(Box<str>),
    /// ReplacePrefixMatch: replaces the matched [`PathMatch::Prefix`].
    Prefix(Box<str>),
}

#[derive(Debug)]
pub struct Backend {
    pub kind: BackendKind,
    /// 0: never picked.
    pub weight: u32,
    /// The backendRef's own filters (header modifiers), applied after the route's.
    pub filters: Vec<Filter>,
    /// The backend service's BackendPolicy or the defaults.
    pub settings: Arc<BackendSettings>,
    pub cache: BackendCache,
}

#[derive(Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// A service port, `name.ns.svc.cluster.local:port`, resolved and balanced.
    Service(Arc<str>),
    /// A backendRef that cannot be used: its share is answered 500. Why, for the body/logs.
    Invalid(Arc<str>),
}

/// A route's retry settings: the resilience layer's own type, so what the controller sent is
/// what the retry loop reads.
pub use crate::resilience::retry::RetryConfig as Retry;

/// A service's BackendPolicy, or the defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct BackendSettings {
    pub budget: RetryBudget,
    pub breaker: Breaker,
    /// `None`: the proxy's own setting.
    pub connect_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    /// Default whole-request timeout for routes that set none; `None`: none.
    pub request_timeout: Option<Duration>,
    /// `"backendpolicy/<ns>/<name>"` or `"default"`.
    pub source: Arc<str>,
}

impl Default for BackendSettings {
    fn default() -> Self {
        Self {
            budget: RetryBudget::default(),
            breaker: Breaker::default(),
            connect_timeout: None,
            idle_timeout: None,
            request_timeout: None,
            source: Arc::from("default"),
        }
    }
}

/// A BackendPolicy's `retryBudget` (the resilience layer's type).
pub use crate::resilience::retry::BudgetConfig as RetryBudget;

/// A BackendPolicy's `circuitBreaker` (the resilience layer's type).
pub use crate::resilience::breaker::BreakerConfig as Breaker;

/// Something in a policy that could not be used, and what was done about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A route's field did not convert; the route and its matches were dropped.
    #[error("route {route} dropped: {field} = {value:?}: {reason}")]
    Route {
        route: Arc<str>,
        /// Where in the route, e.g. `filters[0].request_redirect.status`.
        field: String,
        value: String,
        reason: String,
    },
    /// A match names a route that is not in the policy; the match was dropped.
    #[error("matches[{index}] dropped: route = {route}: out of range ({routes} routes)")]
    MatchRoute {
        index: usize,
        route: u32,
        routes: usize,
    },
    /// A BackendSettings field is out of range; its default is used.
    #[error("{settings}: {field} = {value}: {reason}; using the default")]
    Settings {
        /// The settings' source (`backendpolicy/ns/name`).
        settings: Arc<str>,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

/// A compiled policy and what had to be left out of it.
#[derive(Debug, Default)]
pub struct Compiled {
    pub policy: Policy,
    pub problems: Vec<PolicyError>,
}

/// Compiles `pb` into a [`Policy`]; never fails as a whole (see the module doc).
pub fn compile(pb: &pb::OutboundPolicy) -> Compiled {
    let mut problems = Vec::new();
    let settings = Arc::new(settings(pb.settings.as_ref(), &mut problems));
    let labels: Vec<Arc<str>> = pb
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| label(r.r#ref.as_ref(), i))
        .collect();

    // Matches first, grouped by route: a route whose match fails is dropped whole.
    let mut route_ok = vec![true; pb.routes.len()];
    let mut matches: Vec<(usize, Match)> = Vec::with_capacity(pb.matches.len());
    for (index, m) in pb.matches.iter().enumerate() {
        let r = m.route as usize;
        if r >= pb.routes.len() {
            problems.push(PolicyError::MatchRoute {
                index,
                route: m.route,
                routes: pb.routes.len(),
            });
            continue;
        }
        if !route_ok[r] {
            continue;
        }
        match compile_match(m) {
            Ok(c) => matches.push((index, c)),
            Err(e) => {
                route_ok[r] = false;
                problems.push(e.at(&labels[r], &format!("matches[{index}].")));
            }
        }
    }

    // Routes, renumbered as dropped ones leave.
    let mut routes = Vec::with_capacity(pb.routes.len());
    let mut renumber = vec![usize::MAX; pb.routes.len()];
    for (i, r) in pb.routes.iter().enumerate() {
        if !route_ok[i] {
            continue;
        }
        let prefix_only = matches
            .iter()
            .filter(|(_, m)| m.route == i)
            .all(|(_, m)| matches!(m.path, PathMatch::Prefix(_)));
        match compile_route(r, labels[i].clone(), &settings, prefix_only, &mut problems) {
            Ok(route) => {
                renumber[i] = routes.len();
                routes.push(route);
            }
            Err(e) => problems.push(e.at(&labels[i], "")),
        }
    }
    let matches = matches
        .into_iter()
        .filter_map(|(_, mut m)| {
            let r = renumber[m.route];
            (r != usize::MAX).then(|| {
                m.route = r;
                m
            })
        })
        .collect();

    Compiled {
        policy: Policy {
            service: pb.service.as_ref().map(|s| ServiceRef {
                namespace: Arc::from(s.namespace.as_str()),
                name: Arc::from(s.name.as_str()),
                port: u16::try_from(s.port).unwrap_or(0),
            }),
            opaque: pb.opaque,
            routes,
            matches,
            routed: !pb.routes.is_empty() || !pb.matches.is_empty(),
            settings,
            source: Arc::from(if pb.source.is_empty() {
                "default"
            } else {
                pb.source.as_str()
            }),
        },
        problems,
    }
}

/// A route's metric label (`<kind>/<ns>/<name>/<rule>`), for inbound routes too.
pub(crate) fn route_label(r: Option<&pb::RouteRef>, index: usize) -> Arc<str> {
    label(r, index)
}

/// Compiles one match for another policy (inbound routes); the problem as text.
pub(crate) fn compile_route_match(m: &pb::RouteMatch) -> Result<Match, String> {
    compile_match(m).map_err(|e| format!("{}={:?}: {}", e.field, e.value, e.reason))
}

fn label(r: Option<&pb::RouteRef>, index: usize) -> Arc<str> {
    match r {
        Some(r) => {
            let rule = if r.rule.is_empty() {
                index.to_string()
            } else {
                r.rule.clone()
            };
            Arc::from(format!("{}/{}/{}/{}", r.kind, r.namespace, r.name, rule))
        }
        // The contract always names a route; an unnamed one still gets a bounded label.
        None => Arc::from(format!("unknown///{index}")),
    }
}

/// A conversion failure inside a route, before the route's label is known.
#[derive(Debug)]
struct FieldError {
    field: String,
    value: String,
    reason: String,
}

impl FieldError {
    fn new(field: impl Into<String>, value: impl Into<String>, reason: impl ToString) -> Self {
        Self {
            field: field.into(),
            value: value.into(),
            reason: reason.to_string(),
        }
    }

    fn within(mut self, outer: &str) -> Self {
        self.field = format!("{outer}{}", self.field);
        self
    }

    fn at(self, route: &Arc<str>, outer: &str) -> PolicyError {
        PolicyError::Route {
            route: route.clone(),
            field: format!("{outer}{}", self.field),
            value: self.value,
            reason: self.reason,
        }
    }
}

/// Compiles `re` to match whole inputs only.
pub fn anchored_regex(re: &str) -> Result<Regex, regex::Error> {
    RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
}

fn regex(field: &str, re: &str) -> Result<Regex, FieldError> {
    anchored_regex(re).map_err(|e| FieldError::new(field, re, one_line(&e.to_string())))
}

/// regex's errors draw a caret under the pattern over several lines; logs want one.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn header_name(field: &str, name: &str) -> Result<HeaderName, FieldError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| FieldError::new(field, name, "not a valid HTTP header name"))
}

fn header_value(field: &str, value: &str) -> Result<HeaderValue, FieldError> {
    HeaderValue::from_str(value).map_err(|_| {
        FieldError::new(
            field,
            value,
            "not a valid HTTP header value (control characters?)",
        )
    })
}

/// A path the proxy can put in a request line: starts with `/`, no query or fragment.
fn path(field: &str, p: &str, allow_empty: bool) -> Result<Box<str>, FieldError> {
    let ok = (allow_empty && p.is_empty())
        || (p.starts_with('/')
            && !p.contains(['?', '#'])
            && p.parse::<http::uri::PathAndQuery>().is_ok());
    if ok {
        Ok(p.into())
    } else {
        Err(FieldError::new(
            field,
            p,
            "not a path (must start with '/', without '?' or '#')",
        ))
    }
}

fn value_match(
    field: &str,
    exact: Option<&str>,
    regex_src: Option<&str>,
) -> Result<ValueMatch, FieldError> {
    match (exact, regex_src) {
        (_, Some(re)) => Ok(ValueMatch::Regex(regex(&format!("{field}.regex"), re)?)),
        (Some(v), None) => Ok(ValueMatch::Exact(v.as_bytes().into())),
        (None, None) => Err(FieldError::new(field, "", "no value to match")),
    }
}

fn compile_match(m: &pb::RouteMatch) -> Result<Match, FieldError> {
    use pb::path_match::Kind;
    let path = match m.path.as_ref().and_then(|p| p.kind.as_ref()) {
        None => PathMatch::Prefix("/".into()),
        Some(Kind::Exact(p)) => PathMatch::Exact(path("path.exact", p, false)?),
        Some(Kind::Prefix(p)) => {
            let p = path("path.prefix", p, false)?;
            // "A trailing `/` is ignored" (Gateway API): "/foo/" is the prefix "/foo".
            let trimmed = p.trim_end_matches('/');
            PathMatch::Prefix(if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed.into()
            })
        }
        Some(Kind::Regex(re)) => PathMatch::Regex(regex("path.regex", re)?),
    };
    let mut headers: Vec<HeaderMatch> = Vec::with_capacity(m.headers.len());
    for (i, h) in m.headers.iter().enumerate() {
        use pb::header_match::Value;
        let field = format!("headers[{i}]");
        let name = header_name(&format!("{field}.name"), &h.name)?;
        let (exact, re) = match &h.value {
            Some(Value::Exact(v)) => (Some(v.as_str()), None),
            Some(Value::Regex(r)) => (None, Some(r.as_str())),
            None => (None, None),
        };
        let value = value_match(&field, exact, re)?;
        // "Only the first entry with an equivalent name MUST be considered."
        if !headers.iter().any(|x| x.name == name) {
            headers.push(HeaderMatch { name, value });
        }
    }
    let mut query_params: Vec<QueryParamMatch> = Vec::with_capacity(m.query_params.len());
    for (i, q) in m.query_params.iter().enumerate() {
        use pb::query_param_match::Value;
        let field = format!("query_params[{i}]");
        if q.name.is_empty() {
            return Err(FieldError::new(
                format!("{field}.name"),
                "",
                "empty parameter name",
            ));
        }
        let (exact, re) = match &q.value {
            Some(Value::Exact(v)) => (Some(v.as_str()), None),
            Some(Value::Regex(r)) => (None, Some(r.as_str())),
            None => (None, None),
        };
        let value = value_match(&field, exact, re)?;
        if !query_params.iter().any(|x| *x.name == *q.name) {
            query_params.push(QueryParamMatch {
                name: q.name.as_str().into(),
                value,
            });
        }
    }
    let method = match m.method.as_str() {
        "" => None,
        s => Some(
            Method::from_bytes(s.as_bytes())
                .map_err(|_| FieldError::new("method", s, "not an HTTP method token"))?,
        ),
    };
    Ok(Match {
        route: m.route as usize,
        path,
        headers,
        query_params,
        method,
    })
}

fn duration(field: &str, d: &prost_types::Duration) -> Result<Duration, FieldError> {
    Duration::try_from(*d)
        .map_err(|_| FieldError::new(field, format!("{}s {}ns", d.seconds, d.nanos), "negative"))
}

/// A Gateway API timeout: zero disables it.
fn timeout(field: &str, d: Option<&prost_types::Duration>) -> Result<Option<Duration>, FieldError> {
    match d {
        None => Ok(None),
        Some(d) => Ok(Some(duration(field, d)?).filter(|d| !d.is_zero())),
    }
}

fn compile_route(
    r: &pb::Route,
    label: Arc<str>,
    defaults: &Arc<BackendSettings>,
    prefix_only: bool,
    problems: &mut Vec<PolicyError>,
) -> Result<Route, FieldError> {
    let filters = compile_filters(&r.filters, prefix_only, Some((defaults, &mut *problems)))?;
    let redirects = filters.iter().any(|f| matches!(f, Filter::Redirect(_)));
    if redirects && filters.iter().any(|f| matches!(f, Filter::Rewrite(_))) {
        return Err(FieldError::new(
            "filters",
            "request_redirect + url_rewrite",
            "a rule may not both redirect and rewrite (Gateway API)",
        ));
    }
    let mut backends = Vec::with_capacity(r.backends.len());
    for (i, b) in r.backends.iter().enumerate() {
        let mut backend = compile_backend(b, defaults, problems);
        backend.filters = compile_filters(&b.filters, prefix_only, None)
            .map_err(|e| e.within(&format!("backends[{i}].")))?;
        backends.push(backend);
    }
    let request_timeout = match &r.request_timeout {
        Some(d) => timeout("request_timeout", Some(d))?,
        None => defaults.request_timeout,
    };
    let retry = match &r.retry {
        None => None,
        Some(rt) => {
            let mut codes = Vec::with_capacity(rt.codes.len());
            for &c in &rt.codes {
                match u16::try_from(c)
                    .ok()
                    .and_then(|c| StatusCode::from_u16(c).ok())
                {
                    Some(s) => codes.push(s.as_u16()),
                    None => {
                        return Err(FieldError::new(
                            "retry.codes",
                            c.to_string(),
                            "not an HTTP status code (100..=999)",
                        ))
                    }
                }
            }
            codes.sort_unstable();
            codes.dedup();
            let mut grpc_codes = 0u32;
            for &c in &rt.grpc_codes {
                if c > 16 {
                    return Err(FieldError::new(
                        "retry.grpc_codes",
                        c.to_string(),
                        "not a gRPC status code (0..=16)",
                    ));
                }
                grpc_codes |= 1 << c;
            }
            Some(Retry {
                attempts: rt.attempts,
                codes,
                grpc_codes,
                backoff: timeout("retry.backoff", rt.backoff.as_ref())?.unwrap_or_default(),
            })
        }
    };
    Ok(Route {
        label,
        filters,
        backends,
        request_timeout,
        backend_request_timeout: timeout(
            "backend_request_timeout",
            r.backend_request_timeout.as_ref(),
        )?,
        retry,
        cache: RouteCache::default(),
    })
}

/// A backend without its filters.
fn compile_backend(
    b: &pb::Backend,
    defaults: &Arc<BackendSettings>,
    problems: &mut Vec<PolicyError>,
) -> Backend {
    use pb::backend::Kind;
    let kind = match &b.kind {
        Some(Kind::Target(t)) if !t.is_empty() => BackendKind::Service(Arc::from(t.as_str())),
        Some(Kind::Target(_)) | None => BackendKind::Invalid(Arc::from("backend names no service")),
        Some(Kind::Invalid(why)) => BackendKind::Invalid(Arc::from(why.as_str())),
    };
    let settings = match &b.settings {
        Some(s) => Arc::new(settings(Some(s), problems)),
        None => defaults.clone(),
    };
    Backend {
        kind,
        weight: b.weight,
        filters: Vec::new(),
        settings,
        cache: BackendCache::default(),
    }
}

/// `rule`: a rule's filters, with what a mirror's backend needs (a backend's filters: `None`,
/// header modifiers only).
fn compile_filters(
    fs: &[pb::Filter],
    prefix_only: bool,
    mut rule: Option<(&Arc<BackendSettings>, &mut Vec<PolicyError>)>,
) -> Result<Vec<Filter>, FieldError> {
    use pb::filter::Kind;
    let mut out = Vec::with_capacity(fs.len());
    for (i, f) in fs.iter().enumerate() {
        let field = format!("filters[{i}].");
        let f = match &f.kind {
            Some(Kind::RequestHeaderModifier(m)) => Filter::RequestHeaders(
                modifier(m).map_err(|e| e.within(&format!("{field}request_header_modifier.")))?,
            ),
            Some(Kind::ResponseHeaderModifier(m)) => Filter::ResponseHeaders(
                modifier(m).map_err(|e| e.within(&format!("{field}response_header_modifier.")))?,
            ),
            Some(Kind::RequestRedirect(r)) if rule.is_some() => Filter::Redirect(
                redirect(r, prefix_only)
                    .map_err(|e| e.within(&format!("{field}request_redirect.")))?,
            ),
            Some(Kind::UrlRewrite(r)) if rule.is_some() => Filter::Rewrite(
                rewrite(r, prefix_only).map_err(|e| e.within(&format!("{field}url_rewrite.")))?,
            ),
            Some(Kind::RequestMirror(m)) if rule.is_some() => {
                let Some((defaults, problems)) = rule.as_mut() else {
                    continue;
                };
                if m.denominator == 0 || m.numerator > m.denominator {
                    return Err(FieldError::new(
                        format!("{field}request_mirror"),
                        format!("{}/{}", m.numerator, m.denominator),
                        "not a share between 0 and 1",
                    ));
                }
                let Some(b) = &m.backend else {
                    return Err(FieldError::new(
                        format!("{field}request_mirror.backend"),
                        "",
                        "missing",
                    ));
                };
                Filter::Mirror(Mirror {
                    backend: compile_backend(b, defaults, problems),
                    numerator: m.numerator,
                    denominator: m.denominator,
                    counters: OnceLock::new(),
                })
            }
            Some(Kind::RequestRedirect(_) | Kind::UrlRewrite(_) | Kind::RequestMirror(_)) => {
                return Err(FieldError::new(
                    field.trim_end_matches('.'),
                    "request_redirect/url_rewrite/request_mirror",
                    "a backend's filters may only modify headers",
                ))
            }
            None => {
                return Err(FieldError::new(
                    field.trim_end_matches('.'),
                    "",
                    "empty filter (a newer controller's filter kind?)",
                ))
            }
        };
        out.push(f);
    }
    Ok(out)
}

fn modifier(m: &pb::HeaderModifier) -> Result<HeaderModifier, FieldError> {
    let pairs =
        |hs: &[pb::Header], what: &str| -> Result<Vec<(HeaderName, HeaderValue)>, FieldError> {
            hs.iter()
                .enumerate()
                .map(|(i, h)| {
                    Ok((
                        header_name(&format!("{what}[{i}].name"), &h.name)?,
                        header_value(&format!("{what}[{i}].value"), &h.value)?,
                    ))
                })
                .collect()
        };
    Ok(HeaderModifier {
        set: pairs(&m.set, "set")?,
        add: pairs(&m.add, "add")?,
        remove: m
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| header_name(&format!("remove[{i}]"), n))
            .collect::<Result<_, _>>()?,
    })
}

fn path_modifier(
    m: Option<&pb::PathModifier>,
    prefix_only: bool,
) -> Result<Option<PathModifier>, FieldError> {
    use pb::path_modifier::Kind;
    match m.and_then(|m| m.kind.as_ref()) {
        None => Ok(None),
        Some(Kind::Full(p)) => Ok(Some(PathModifier::Full(path("path.full", p, false)?))),
        Some(Kind::Prefix(p)) => {
            if !prefix_only {
                return Err(FieldError::new(
                    "path.prefix",
                    p,
                    "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
                ));
            }
            // "" is allowed: it strips the prefix.
            Ok(Some(PathModifier::Prefix(path("path.prefix", p, true)?)))
        }
    }
}

/// A hostname as the Gateway API's PreciseHostname: a host, no port.
fn hostname(field: &str, h: &str) -> Result<Option<Box<str>>, FieldError> {
    if h.is_empty() {
        return Ok(None);
    }
    match h.parse::<http::uri::Authority>() {
        Ok(a) if a.port().is_none() && a.as_str() == a.host() && !h.contains('@') => {
            Ok(Some(h.to_ascii_lowercase().into()))
        }
        _ => Err(FieldError::new(
            field,
            h,
            "not a hostname (no port, no userinfo)",
        )),
    }
}

fn redirect(r: &pb::RequestRedirect, prefix_only: bool) -> Result<Redirect, FieldError> {
    let scheme = match r.scheme.as_str() {
        "" => None,
        "http" => Some(RedirectScheme::Http),
        "https" => Some(RedirectScheme::Https),
        s => return Err(FieldError::new("scheme", s, "not http or https")),
    };
    let port = match r.port {
        0 => None,
        p => Some(
            u16::try_from(p)
                .map_err(|_| FieldError::new("port", p.to_string(), "not a port (1..=65535)"))?,
        ),
    };
    let status = match r.status {
        0 => StatusCode::FOUND,
        s @ (301 | 302 | 303 | 307 | 308) => {
            StatusCode::from_u16(s as u16).unwrap_or(StatusCode::FOUND)
        }
        s => {
            return Err(FieldError::new(
                "status",
                s.to_string(),
                "not a redirect status (301, 302, 303, 307 or 308)",
            ))
        }
    };
    Ok(Redirect {
        scheme,
        hostname: hostname("hostname", &r.hostname)?,
        port,
        path: path_modifier(r.path.as_ref(), prefix_only)?,
        status,
    })
}

fn rewrite(r: &pb::UrlRewrite, prefix_only: bool) -> Result<Rewrite, FieldError> {
    let hostname = match hostname("hostname", &r.hostname)? {
        Some(h) => Some(header_value("hostname", &h)?),
        None => None,
    };
    Ok(Rewrite {
        hostname,
        path: path_modifier(r.path.as_ref(), prefix_only)?,
    })
}

/// Converts BackendSettings, defaulting (and reporting) what is out of range.
fn settings(s: Option<&pb::BackendSettings>, problems: &mut Vec<PolicyError>) -> BackendSettings {
    let mut out = BackendSettings::default();
    let Some(s) = s else {
        return out;
    };
    if !s.source.is_empty() {
        out.source = Arc::from(s.source.as_str());
    }
    let mut bad: Vec<(&'static str, String, &'static str)> = Vec::new();
    // An unset or zero duration takes the default (`None` here); a negative one is reported.
    let mut dur = |field: &'static str, d: Option<&prost_types::Duration>| -> Option<Duration> {
        let d = d?;
        match Duration::try_from(*d) {
            Ok(d) => Some(d).filter(|d| !d.is_zero()),
            Err(_) => {
                bad.push((field, format!("{}s {}ns", d.seconds, d.nanos), "negative"));
                None
            }
        }
    };
    out.connect_timeout = dur("connect_timeout", s.connect_timeout.as_ref());
    out.idle_timeout = dur("idle_timeout", s.idle_timeout.as_ref());
    out.request_timeout = dur("request_timeout", s.request_timeout.as_ref());
    let (budget_ttl, base, max) = (
        s.budget
            .as_ref()
            .and_then(|b| dur("budget.ttl", b.ttl.as_ref())),
        s.breaker
            .as_ref()
            .and_then(|b| dur("breaker.base_ejection", b.base_ejection.as_ref())),
        s.breaker
            .as_ref()
            .and_then(|b| dur("breaker.max_ejection", b.max_ejection.as_ref())),
    );
    if let Some(b) = &s.budget {
        let d = RetryBudget::default();
        out.budget.ttl = budget_ttl.unwrap_or(d.ttl);
        out.budget.min_per_second = match b.min_retries_per_second {
            0 => d.min_per_second,
            n => n,
        };
        out.budget.ratio = if b.retry_ratio == 0.0 {
            d.ratio
        } else if b.retry_ratio.is_finite() && b.retry_ratio > 0.0 && b.retry_ratio <= 1000.0 {
            b.retry_ratio
        } else {
            bad.push((
                "budget.retry_ratio",
                b.retry_ratio.to_string(),
                "not in (0, 1000]",
            ));
            d.ratio
        };
    }
    if let Some(b) = &s.breaker {
        let d = Breaker::default();
        out.breaker.consecutive_failures = b.consecutive_failures;
        out.breaker.base_ejection = base.unwrap_or(d.base_ejection);
        out.breaker.max_ejection = max.unwrap_or(d.max_ejection);
        if out.breaker.max_ejection < out.breaker.base_ejection {
            bad.push((
                "breaker.max_ejection",
                format!("{:?}", out.breaker.max_ejection),
                "shorter than base_ejection",
            ));
            out.breaker.max_ejection = out.breaker.base_ejection.max(d.max_ejection);
        }
        out.breaker.jitter = if b.jitter == 0.0 {
            d.jitter
        } else if (0.0..=1.0).contains(&b.jitter) {
            b.jitter
        } else {
            bad.push(("breaker.jitter", b.jitter.to_string(), "not in [0, 1]"));
            d.jitter
        };
        out.breaker.max_concurrent_requests = Some(b.max_concurrent_requests).filter(|&n| n > 0);
        out.breaker.max_pending_requests = Some(b.max_pending_requests).filter(|&n| n > 0);
    }
    problems.extend(
        bad.into_iter()
            .map(|(field, value, reason)| PolicyError::Settings {
                settings: out.source.clone(),
                field,
                value,
                reason,
            }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::test_util::{
        self as tu, exact, header, header_re, on, policy, prefix, query_re, rule,
    };
    use pb::filter::Kind as F;

    fn dur(secs: i64, nanos: i32) -> Option<prost_types::Duration> {
        Some(prost_types::Duration {
            seconds: secs,
            nanos,
        })
    }

    fn with_filter(mut r: pb::Route, k: F) -> pb::Route {
        r.filters.push(pb::Filter { kind: Some(k) });
        r
    }

    fn redirect_status(status: u32) -> F {
        F::RequestRedirect(pb::RequestRedirect {
            status,
            ..Default::default()
        })
    }

    /// The error of a policy whose route 1 ("bad") is broken as `edit` says, with routes
    /// 0 ("good") and 2 ("after") fine; checks that only "bad" was dropped.
    fn broken(edit: impl FnOnce(&mut pb::OutboundPolicy)) -> PolicyError {
        let mut p = policy(
            &["good", "bad", "after"],
            vec![
                on(0, exact("/good")),
                on(1, prefix("/bad")),
                on(2, prefix("/after")),
            ],
        );
        edit(&mut p);
        let c = compile(&p);
        assert_eq!(c.problems.len(), 1, "{:?}", c.problems);
        let labels: Vec<&str> = c.policy.routes.iter().map(|r| &*r.label).collect();
        assert_eq!(labels, ["httproute/ns/good/0", "httproute/ns/after/0"]);
        // The remaining matches point at the renumbered routes.
        let routes: Vec<usize> = c.policy.matches.iter().map(|m| m.route).collect();
        assert_eq!(routes, [0, 1]);
        assert!(c.policy.routed);
        c.problems.into_iter().next().unwrap()
    }

    fn route_error(e: &PolicyError) -> (&str, &str, &str) {
        match e {
            PolicyError::Route {
                route,
                field,
                value,
                ..
            } => (route, field, value),
            other => panic!("not a route error: {other:?}"),
        }
    }

    #[test]
    fn a_bad_field_drops_its_route_only_and_names_route_field_and_value() {
        type Edit = Box<dyn FnOnce(&mut pb::OutboundPolicy)>;
        let cases: Vec<(Edit, &str, &str)> = vec![
            (
                Box::new(|p| p.matches[1].path = tu::regex("/bad(")),
                "matches[1].path.regex",
                "/bad(",
            ),
            (
                Box::new(|p| p.matches[1].headers = vec![header("bad name", "v")]),
                "matches[1].headers[0].name",
                "bad name",
            ),
            (
                Box::new(|p| p.matches[1].headers = vec![header_re("x", "[")]),
                "matches[1].headers[0].regex",
                "[",
            ),
            (
                Box::new(|p| p.matches[1].query_params = vec![query_re("q", "a{2,1}")]),
                "matches[1].query_params[0].regex",
                "a{2,1}",
            ),
            (
                Box::new(|p| p.matches[1].method = "GE T".into()),
                "matches[1].method",
                "GE T",
            ),
            (
                Box::new(|p| p.matches[1].path = prefix("bad")),
                "matches[1].path.prefix",
                "bad",
            ),
            (
                Box::new(|p| p.routes[1] = with_filter(rule("bad"), redirect_status(305))),
                "filters[0].request_redirect.status",
                "305",
            ),
            (
                Box::new(|p| {
                    p.routes[1] = with_filter(
                        rule("bad"),
                        F::RequestRedirect(pb::RequestRedirect {
                            scheme: "ftp".into(),
                            ..Default::default()
                        }),
                    )
                }),
                "filters[0].request_redirect.scheme",
                "ftp",
            ),
            (
                Box::new(|p| {
                    p.routes[1] = with_filter(
                        rule("bad"),
                        F::RequestRedirect(pb::RequestRedirect {
                            hostname: "example.org:80".into(),
                            ..Default::default()
                        }),
                    )
                }),
                "filters[0].request_redirect.hostname",
                "example.org:80",
            ),
            (
                Box::new(|p| {
                    p.routes[1] = with_filter(
                        rule("bad"),
                        F::RequestHeaderModifier(pb::HeaderModifier {
                            set: vec![pb::Header {
                                name: "x-ok".into(),
                                value: "line\nbreak".into(),
                            }],
                            ..Default::default()
                        }),
                    )
                }),
                "filters[0].request_header_modifier.set[0].value",
                "line\nbreak",
            ),
            (
                Box::new(|p| {
                    p.routes[1] = with_filter(
                        rule("bad"),
                        F::ResponseHeaderModifier(pb::HeaderModifier {
                            remove: vec!["no:colons".into()],
                            ..Default::default()
                        }),
                    )
                }),
                "filters[0].response_header_modifier.remove[0]",
                "no:colons",
            ),
            (
                Box::new(|p| {
                    // ReplacePrefixMatch on a rule whose match is not a prefix.
                    p.matches[1].path = exact("/bad");
                    p.routes[1] = with_filter(
                        rule("bad"),
                        F::UrlRewrite(pb::UrlRewrite {
                            path: Some(pb::PathModifier {
                                kind: Some(pb::path_modifier::Kind::Prefix("/x".into())),
                            }),
                            ..Default::default()
                        }),
                    )
                }),
                "filters[0].url_rewrite.path.prefix",
                "/x",
            ),
            (
                Box::new(|p| {
                    let r = with_filter(rule("bad"), redirect_status(0));
                    p.routes[1] = with_filter(r, F::UrlRewrite(pb::UrlRewrite::default()));
                }),
                "filters",
                "request_redirect + url_rewrite",
            ),
            (
                Box::new(|p| {
                    p.routes[1].backends[0].filters = vec![pb::Filter {
                        kind: Some(redirect_status(0)),
                    }]
                }),
                "backends[0].filters[0]",
                "request_redirect/url_rewrite/request_mirror",
            ),
            (
                Box::new(|p| {
                    p.routes[1].filters = vec![pb::Filter {
                        kind: Some(pb::filter::Kind::RequestMirror(pb::RequestMirror {
                            backend: None,
                            numerator: 3,
                            denominator: 2,
                        })),
                    }]
                }),
                "filters[0].request_mirror",
                "3/2",
            ),
            (
                Box::new(|p| p.routes[1].filters = vec![pb::Filter { kind: None }]),
                "filters[0]",
                "",
            ),
            (
                Box::new(|p| {
                    p.routes[1].retry = Some(pb::Retry {
                        codes: vec![503, 1000],
                        ..Default::default()
                    })
                }),
                "retry.codes",
                "1000",
            ),
            (
                Box::new(|p| {
                    p.routes[1].retry = Some(pb::Retry {
                        grpc_codes: vec![17],
                        ..Default::default()
                    })
                }),
                "retry.grpc_codes",
                "17",
            ),
            (
                Box::new(|p| p.routes[1].request_timeout = dur(-1, 0)),
                "request_timeout",
                "-1s 0ns",
            ),
        ];
        for (edit, field, value) in cases {
            let e = broken(edit);
            assert_eq!(route_error(&e), ("httproute/ns/bad/0", field, value), "{e}");
            let msg = e.to_string();
            assert!(
                msg.starts_with("route httproute/ns/bad/0 dropped: ") && msg.contains(field),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_mirror_samples_its_share() {
        let m = |numerator, denominator| Mirror {
            backend: compile_backend(&pb::Backend::default(), &Arc::default(), &mut Vec::new()),
            numerator,
            denominator,
            counters: OnceLock::new(),
        };
        let share = |m: &Mirror| (0..1000).filter(|i| m.samples(*i as f64 / 1000.0)).count();
        assert_eq!(share(&m(1, 1)), 1000);
        assert_eq!(share(&m(0, 100)), 0);
        assert_eq!(share(&m(25, 100)), 250);
        assert_eq!(share(&m(1, 3)), 334);
    }

    #[test]
    fn a_match_naming_a_missing_route_is_dropped() {
        let c = compile(&policy(
            &["r"],
            vec![on(3, prefix("/x")), on(0, prefix("/"))],
        ));
        assert_eq!(
            c.problems,
            vec![PolicyError::MatchRoute {
                index: 0,
                route: 3,
                routes: 1
            }]
        );
        assert_eq!(
            c.problems[0].to_string(),
            "matches[0] dropped: route = 3: out of range (1 routes)"
        );
        assert_eq!(c.policy.matches.len(), 1);
        assert_eq!(c.policy.routes.len(), 1);
    }

    #[test]
    fn regex_errors_fit_on_one_line() {
        let e = broken(|p| p.matches[1].path = tu::regex("(unclosed"));
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn labels_names_and_timeouts() {
        let mut p = policy(&["a", "b"], vec![on(0, None), on(1, None)]);
        p.routes[0].r#ref.as_mut().unwrap().rule = "named".into();
        p.routes[1].r#ref.as_mut().unwrap().rule = String::new();
        p.routes[1].r#ref.as_mut().unwrap().kind = "grpcroute".into();
        p.routes[0].request_timeout = dur(0, 0);
        p.routes[0].backend_request_timeout = dur(0, 250_000_000);
        p.settings = Some(pb::BackendSettings {
            request_timeout: dur(5, 0),
            ..Default::default()
        });
        p.routes[1].filters.push(pb::Filter {
            kind: Some(F::RequestHeaderModifier(pb::HeaderModifier {
                set: vec![pb::Header {
                    name: "X-Mixed-Case".into(),
                    value: "v".into(),
                }],
                ..Default::default()
            })),
        });
        p.routes[1].retry = Some(pb::Retry {
            attempts: 2,
            codes: vec![503, 500, 503],
            grpc_codes: vec![14, 4],
            backoff: dur(0, 25_000_000),
        });
        let c = compile(&p);
        assert_eq!(c.problems, vec![]);
        let [a, b] = &c.policy.routes[..] else {
            panic!("two routes")
        };
        assert_eq!(&*a.label, "httproute/ns/a/named");
        // An unnamed rule is named by its index.
        assert_eq!(&*b.label, "grpcroute/ns/b/1");
        // "0s" disables the route's timeout, even over the service's default.
        assert_eq!(a.request_timeout, None);
        assert_eq!(a.backend_request_timeout, Some(Duration::from_millis(250)));
        assert_eq!(b.request_timeout, Some(Duration::from_secs(5)));
        let Filter::RequestHeaders(m) = &b.filters[0] else {
            panic!("header modifier")
        };
        assert_eq!(m.set[0].0.as_str(), "x-mixed-case");
        let r = b.retry.as_ref().unwrap();
        assert_eq!(r.codes, vec![500, 503]);
        use crate::resilience::retry::Outcome;
        let http = |status| Outcome::Answered { status, grpc: None };
        let grpc = |code| Outcome::Answered {
            status: 200,
            grpc: Some(code),
        };
        assert!(r.retries(http(503), 0));
        assert!(!r.retries(http(502), 0));
        assert!(r.retries(grpc(14), 0) && r.retries(grpc(4), 0));
        assert!(!r.retries(grpc(2), 0) && !r.retries(grpc(99), 0));
        assert_eq!(r.backoff, Duration::from_millis(25));
        assert_eq!(&*c.policy.source, "httproute/ns/test");
        assert_eq!(
            c.policy.service,
            Some(ServiceRef {
                namespace: "ns".into(),
                name: "svc".into(),
                port: 80
            })
        );
    }

    #[test]
    fn no_service_means_route_by_authority() {
        let c = compile(&pb::OutboundPolicy::default());
        assert!(c.problems.is_empty());
        assert_eq!(c.policy.service, None);
        assert!(!c.policy.routed);
        assert_eq!(*c.policy.settings, BackendSettings::default());
        assert_eq!(&*c.policy.source, "default");
    }

    #[test]
    fn settings_defaults_and_literal_zeros() {
        let d = BackendSettings::default();
        assert_eq!(d.budget.ratio, 0.2);
        assert_eq!(d.budget.min_per_second, 10);
        assert_eq!(d.budget.ttl, Duration::from_secs(10));
        assert_eq!(d.breaker.consecutive_failures, 7);
        assert_eq!(d.breaker.base_ejection, Duration::from_secs(1));
        assert_eq!(d.breaker.max_ejection, Duration::from_secs(60));
        assert_eq!(d.breaker.jitter, 0.1);

        let mut problems = Vec::new();
        // Present messages with every scalar zero: defaults where the proto gives only a
        // default, the stated meaning where it gives zero one.
        let s = settings(
            Some(&pb::BackendSettings {
                budget: Some(pb::RetryBudget::default()),
                breaker: Some(pb::CircuitBreaker::default()),
                source: "backendpolicy/ns/bp".into(),
                ..Default::default()
            }),
            &mut problems,
        );
        assert!(problems.is_empty());
        assert_eq!(s.budget, RetryBudget::default());
        assert_eq!(s.breaker.consecutive_failures, 0, "0 disables ejection");
        assert_eq!(s.breaker.jitter, 0.1);
        assert_eq!(s.breaker.max_concurrent_requests, None);
        assert_eq!(&*s.source, "backendpolicy/ns/bp");

        let s = settings(
            Some(&pb::BackendSettings {
                budget: Some(pb::RetryBudget {
                    retry_ratio: 0.5,
                    min_retries_per_second: 3,
                    ttl: dur(30, 0),
                }),
                breaker: Some(pb::CircuitBreaker {
                    consecutive_failures: 3,
                    base_ejection: dur(2, 0),
                    max_ejection: dur(1, 0),
                    jitter: 2.0,
                    max_concurrent_requests: 100,
                    max_pending_requests: 0,
                }),
                connect_timeout: dur(0, 500_000_000),
                idle_timeout: dur(-5, 0),
                request_timeout: dur(0, 0),
                source: "backendpolicy/ns/bp".into(),
            }),
            &mut problems,
        );
        assert_eq!(s.budget.ratio, 0.5);
        assert_eq!(s.budget.min_per_second, 3);
        assert_eq!(s.budget.ttl, Duration::from_secs(30));
        assert_eq!(s.breaker.consecutive_failures, 3);
        assert_eq!(s.breaker.base_ejection, Duration::from_secs(2));
        assert_eq!(s.breaker.max_ejection, Duration::from_secs(60));
        assert_eq!(s.breaker.jitter, 0.1);
        assert_eq!(s.breaker.max_concurrent_requests, Some(100));
        assert_eq!(s.breaker.max_pending_requests, None);
        assert_eq!(s.connect_timeout, Some(Duration::from_millis(500)));
        assert_eq!(s.idle_timeout, None);
        assert_eq!(s.request_timeout, None);
        let fields: Vec<&str> = problems
            .iter()
            .map(|p| match p {
                PolicyError::Settings { field, .. } => *field,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            fields,
            ["idle_timeout", "breaker.max_ejection", "breaker.jitter"]
        );
        assert_eq!(
            problems[2].to_string(),
            "backendpolicy/ns/bp: breaker.jitter = 2: not in [0, 1]; using the default"
        );
    }

    #[test]
    fn backends_keep_their_own_settings_and_invalid_reasons() {
        let mut p = policy(&["r"], vec![on(0, None)]);
        p.routes[0].backends = vec![
            pb::Backend {
                kind: Some(pb::backend::Kind::Invalid(
                    "service ns/gone not found".into(),
                )),
                weight: 1,
                ..Default::default()
            },
            pb::Backend {
                kind: Some(pb::backend::Kind::Target(
                    "b.ns.svc.cluster.local:80".into(),
                )),
                weight: 0,
                settings: Some(pb::BackendSettings {
                    breaker: Some(pb::CircuitBreaker {
                        consecutive_failures: 2,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            pb::Backend::default(),
        ];
        let c = compile(&p);
        assert!(c.problems.is_empty());
        let b = &c.policy.routes[0].backends;
        assert_eq!(
            b[0].kind,
            BackendKind::Invalid("service ns/gone not found".into())
        );
        assert!(Arc::ptr_eq(&b[0].settings, &c.policy.settings));
        assert_eq!(
            b[1].kind,
            BackendKind::Service("b.ns.svc.cluster.local:80".into())
        );
        assert_eq!(b[1].weight, 0);
        assert_eq!(b[1].settings.breaker.consecutive_failures, 2);
        assert!(matches!(b[2].kind, BackendKind::Invalid(_)));
    }
}
