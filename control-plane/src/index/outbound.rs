//! (index, target, caller namespace) → `OutboundPolicy`: the Gateway API
//! mesh profile (GAMMA, GEP-1294) compiled into what a proxy applies. Pure:
//! the index state in, the policy and the topics it depends on out. The
//! same functions give each route's status verdicts ([`route_verdicts`],
//! [`policy_verdicts`]), so what is reported is what is applied.
//!
//! Which routes apply to a request for service `S` port `P` from a client
//! in namespace `C`:
//! - HTTPRoutes and GRPCRoutes with a parentRef of group `""` (or `core`),
//!   kind `Service`, name `S`, namespace `S`'s (the parentRef's namespace,
//!   default the route's own); with `port` only for that port (with
//!   `sectionName`, only the port of that name), without for every port;
//! - *consumer* routes (in `C`, when `C` is not `S`'s namespace) apply to
//!   clients in `C` only and, when `C` has any for `S`/`P`, replace the
//!   *producer* routes (in `S`'s namespace); routes in any third namespace
//!   never apply;
//! - a target that is no service port (a pod IP, an unknown name or port)
//!   gets a policy without `service`; a ClusterIP:port is its service.
//! - When GRPCRoutes and HTTPRoutes both apply, the GRPCRoutes win and the
//!   HTTPRoutes are not Accepted (reason `Conflicted`, GEP-1294).
//!
//! Compilation of a rule (the defaults the CRDs would fill in are applied
//! here, for manifests that never saw an API server):
//! - a rule without matches matches PathPrefix `/`; a match without path
//!   has PathPrefix `/`; headers match Exact by default, names lower-cased,
//!   only the first of equal names counts; query parameters likewise
//!   (names case-sensitive); RegularExpression values are RE2 syntax (the
//!   `regex` crate), matched against the whole value;
//! - precedence across every rule of every applicable route (HTTPRoute):
//!   Exact path, then RegularExpression path (implementation-specific in
//!   the spec; longer first), then the longest PathPrefix; then a method
//!   match; then more header matches; then more query matches; then the
//!   oldest route (`creationTimestamp`; unset sorts last); then
//!   `namespace/name`; then rule order. GRPCRoute: more characters of
//!   service, then of method, then more header matches, then the same
//!   ties. `OutboundPolicy.matches` lists them in that order;
//! - GRPCRoute method matches become path matches: service and method →
//!   Exact `/service/method`; service only → PathPrefix `/service`; method
//!   only → RegularExpression `/[^/]+/method`; RegularExpression type →
//!   a regex of both parts;
//! - backendRefs: kind Service (group `""`), namespace default the
//!   route's; cross-namespace references need no ReferenceGrant (GEP-1294:
//!   mesh routes only augment what the client can already reach); port
//!   default the requested port; a Service or port that does not exist,
//!   or another kind, becomes an `invalid` backend (its share is answered
//!   500) and sets `ResolvedRefs=False`; weight default 1;
//! - `timeouts.request`/`backendRequest` and the experimental `retry`
//!   (`attempts` default 1, codes 400-599). `"0s"` is sent as a zero
//!   duration: no timeout. GRPCRoute has neither, so Weft reads
//!   annotations on it (as Linkerd does with its own):
//!   `retry.weft.dev/grpc-codes` (comma-separated gRPC code names or
//!   numbers, e.g. `unavailable,deadline-exceeded`),
//!   `retry.weft.dev/attempts` (default 1), `retry.weft.dev/backoff`,
//!   `timeout.weft.dev/request`, `timeout.weft.dev/backend-request`
//!   (Gateway API durations);
//! - a route with anything that cannot be applied (bad regex or path,
//!   unknown match type or method, unsupported filter such as CORS,
//!   redirect together with rewrite, bad duration or annotation) is
//!   reported `Accepted=False`; the other routes still apply. If an earlier
//!   version of it was accepted, that version stays in force (the index
//!   holds it: [`State::held_routes`]) and the status message says so;
//!   a route that was never valid is left out whole. Deleting the route
//!   removes both.
//!
//! `settings` (service and each backend): the BackendPolicy targeting the
//! service (a port-specific targetRef beats a whole-service one, then the
//! oldest policy, then the name), or the defaults.

use std::cmp::{Ordering, Reverse};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use weft_proto::destination as pb;
use weft_proto::prost_types;

use super::{State, Topic};
use crate::model::gateway::{
    BackendRef, GrpcRouteRule, HeaderFilter, HttpRouteRule, ParentReference, PathModifier,
    RequestMirrorFilter, RouteFilter, ValueMatch,
};
use crate::model::names::Target;
use crate::model::policy::{self, Settings};
use crate::model::{duration, Kind, ObjectKey, Policy, Route, RouteSpec, Service};

/// Annotations read on GRPCRoutes.
pub const GRPC_CODES_ANNOTATION: &str = "retry.weft.dev/grpc-codes";
pub const ATTEMPTS_ANNOTATION: &str = "retry.weft.dev/attempts";
pub const BACKOFF_ANNOTATION: &str = "retry.weft.dev/backoff";
pub const REQUEST_TIMEOUT_ANNOTATION: &str = "timeout.weft.dev/request";
pub const BACKEND_REQUEST_TIMEOUT_ANNOTATION: &str = "timeout.weft.dev/backend-request";

/// Retries when a retry stanza does not say `attempts`.
pub const DEFAULT_ATTEMPTS: u32 = 1;

/// Settings the compilation depends on.
#[derive(Clone, Debug)]
pub struct OutboundConfig {
    /// Suffix of backend targets: `<name>.<ns>.svc.<cluster_domain>:<port>`.
    pub cluster_domain: String,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            cluster_domain: "cluster.local".into(),
        }
    }
}

/// Why a route is not accepted: a Gateway API `Accepted` reason and a
/// message naming the field and the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct RouteError {
    pub reason: &'static str,
    pub message: String,
}

fn unsupported(message: String) -> RouteError {
    RouteError {
        reason: "UnsupportedValue",
        message,
    }
}

fn incompatible(message: String) -> RouteError {
    RouteError {
        reason: "IncompatibleFilters",
        message,
    }
}

/// A backendRef that cannot be used: a `ResolvedRefs` reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendProblem {
    pub reason: &'static str,
    pub message: String,
}

/// The outbound policy of `target` as a client in `caller_ns` sees it, and
/// the topics it depends on.
pub fn outbound_policy(
    state: &State,
    target: &Target,
    caller_ns: &str,
    config: &OutboundConfig,
) -> (pb::OutboundPolicy, Vec<Topic>) {
    let caller_ns = if caller_ns.is_empty() {
        crate::model::names::DEFAULT_NAMESPACE
    } else {
        caller_ns
    };
    let (key, port, mut topics) = match target {
        Target::External { .. } => return (unknown_policy(), Vec::new()),
        Target::Service {
            namespace,
            name,
            port,
        } => (
            ObjectKey::new(namespace.clone(), name.clone()),
            *port,
            vec![],
        ),
        Target::Addr(addr) => {
            let topics = vec![Topic::Ip(addr.ip())];
            match state
                .by_cluster_ip
                .get(&addr.ip())
                .and_then(|keys| keys.iter().next())
            {
                Some(key) => (key.clone(), addr.port(), topics),
                // A pod IP or an unknown address: no service.
                None => return (unknown_policy(), topics),
            }
        }
    };
    topics.push(Topic::Service(key.clone()));
    topics.push(Topic::Policy(key.clone()));
    let Some(svc) = state.services.get(&key) else {
        return (unknown_policy(), topics);
    };
    if svc.port(port).is_none() && !(svc.headless && svc.ports.is_empty()) {
        return (unknown_policy(), topics);
    }
    let policy = service_policy(state, svc, port, caller_ns, config, &mut topics);
    (policy, topics)
}

fn unknown_policy() -> pb::OutboundPolicy {
    pb::OutboundPolicy {
        service: None,
        opaque: false,
        routes: Vec::new(),
        matches: Vec::new(),
        settings: Some(backend_settings_pb(&Settings::default(), "default")),
        source: "default".into(),
    }
}

/// One compiled match, with what orders it.
struct Ranked {
    key: MatchRank,
    route: usize,
    m: pb::RouteMatch,
}

/// Where a match stands in Gateway API precedence (see the module docs):
/// sorting by it orders matches across every rule of every route.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct MatchRank {
    /// Higher is more specific (compared in reverse).
    specificity: Reverse<Vec<usize>>,
    /// Older first; unset last.
    created: (bool, Option<Time>),
    namespace: String,
    name: String,
    rule: usize,
    index: usize,
}

impl MatchRank {
    /// The rank of match `index` of rule `rule` of `route`, `specificity`
    /// as its compilation gave it.
    pub(crate) fn new(route: &Route, rule: usize, index: usize, specificity: Vec<usize>) -> Self {
        MatchRank {
            specificity: Reverse(specificity),
            created: (route.meta.created.is_none(), route.meta.created.clone()),
            namespace: route.meta.key.namespace.clone(),
            name: route.meta.key.name.clone(),
            rule,
            index,
        }
    }
}

/// A match with its specificity (compared greater-first).
pub(crate) type RankedMatch = (Vec<usize>, pb::RouteMatch);

/// The matches of each rule of `route`, with the rule's reference: what an
/// inbound route (parentRef a Server) uses of a route; its filters and
/// backendRefs do not apply there. A match that cannot be compiled is the
/// same error it is for a mesh route.
pub(crate) fn rule_matches(
    route: &Route,
) -> Result<Vec<(pb::RouteRef, Vec<RankedMatch>)>, RouteError> {
    let mut out = Vec::new();
    match &route.spec {
        RouteSpec::Http(spec) => {
            for (i, rule) in spec.rules.iter().enumerate() {
                let (matches, _) = http_matches(&format!("spec.rules[{i}]"), rule)?;
                out.push((route_ref(route, i, &rule.name), matches));
            }
        }
        RouteSpec::Grpc(spec) => {
            for (i, rule) in spec.rules.iter().enumerate() {
                let matches = grpc_matches(&format!("spec.rules[{i}]"), rule)?;
                out.push((route_ref(route, i, &rule.name), matches));
            }
        }
    }
    Ok(out)
}

/// A compiled rule: the proto route and its matches.
type CompiledRule = (pb::Route, Vec<RankedMatch>);

/// A route compiled for one service port: its rules (proto routes) and
/// their matches with precedence.
struct Compiled {
    rules: Vec<CompiledRule>,
}

fn service_policy(
    state: &State,
    svc: &Service,
    port: u16,
    caller_ns: &str,
    config: &OutboundConfig,
    topics: &mut Vec<Topic>,
) -> pb::OutboundPolicy {
    let routes = applicable_routes(state, svc, port, caller_ns);
    let mut compiled: Vec<(&Arc<Route>, Compiled)> = Vec::new();
    for route in &routes {
        match compile_route(state, route, Some(port), config, topics) {
            Ok(c) => compiled.push((route, c)),
            Err(e) => {
                tracing::debug!(route = %route.meta.key, kind = %route.kind(), error = %e, "route not applied")
            }
        }
    }
    // GEP-1294: GRPCRoute wins over HTTPRoute on the same service port.
    if compiled.iter().any(|(r, _)| r.kind() == Kind::GrpcRoute) {
        compiled.retain(|(r, _)| r.kind() == Kind::GrpcRoute);
    }
    let mut out_routes = Vec::new();
    let mut ranked = Vec::new();
    let mut sources = Vec::new();
    for (route, c) in compiled {
        sources.push(format!(
            "{}/{}/{}",
            route.kind().as_str().to_ascii_lowercase(),
            route.meta.key.namespace,
            route.meta.key.name
        ));
        for (rule_index, (rule, matches)) in c.rules.into_iter().enumerate() {
            let idx = out_routes.len();
            out_routes.push(rule);
            for (index, (specificity, m)) in matches.into_iter().enumerate() {
                ranked.push(Ranked {
                    key: MatchRank::new(route, rule_index, index, specificity),
                    route: idx,
                    m,
                });
            }
        }
    }
    ranked.sort_by(|a, b| a.key.cmp(&b.key));
    let matches = ranked
        .into_iter()
        .map(|r| pb::RouteMatch {
            route: u32::try_from(r.route).unwrap_or(u32::MAX),
            ..r.m
        })
        .collect();
    let (settings, source) = settings_for(state, svc, port);
    pb::OutboundPolicy {
        service: Some(pb::ServiceRef {
            namespace: svc.key.namespace.clone(),
            name: svc.key.name.clone(),
            port: u32::from(port),
        }),
        opaque: false,
        routes: out_routes,
        matches,
        settings: Some(backend_settings_pb(&settings, &source)),
        source: if sources.is_empty() {
            "default".into()
        } else {
            sources.join(",")
        },
    }
}

/// Whether a parentRef names `svc` (and `port`, when given).
fn parent_matches(route: &Route, p: &ParentReference, svc: &Service, port: Option<u16>) -> bool {
    if !p.is_service() || p.name != svc.key.name {
        return false;
    }
    let ns = p
        .namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(&route.meta.key.namespace);
    if ns != svc.key.namespace {
        return false;
    }
    let Some(port) = port else { return true };
    if let Some(pp) = p.port {
        if pp != i32::from(port) {
            return false;
        }
    }
    if let Some(section) = p.section_name.as_deref().filter(|s| !s.is_empty()) {
        let name = svc.port(port).and_then(|sp| sp.name.as_deref());
        if name != Some(section) {
            return false;
        }
    }
    true
}

/// The routes that apply to `svc`:`port` for a client in `caller_ns`
/// (consumer routes replace producer routes).
fn applicable_routes(state: &State, svc: &Service, port: u16, caller_ns: &str) -> Vec<Arc<Route>> {
    let mut consumer = Vec::new();
    let mut producer = Vec::new();
    for (kind, key) in state.routes_by_parent.get(&svc.key).into_iter().flatten() {
        let Some(route) = state.route_in_force(*kind, key) else {
            continue;
        };
        if !route
            .parent_refs()
            .iter()
            .any(|p| parent_matches(route, p, svc, Some(port)))
        {
            continue;
        }
        let ns = &route.meta.key.namespace;
        if *ns == svc.key.namespace {
            producer.push(route.clone());
        } else if ns == caller_ns {
            consumer.push(route.clone());
        }
    }
    if consumer.is_empty() {
        producer
    } else {
        consumer
    }
}

/// Compiles every rule of `route`. `port`: the service port the request
/// was sent to (the default backend port).
fn compile_route(
    state: &State,
    route: &Route,
    port: Option<u16>,
    config: &OutboundConfig,
    topics: &mut Vec<Topic>,
) -> Result<Compiled, RouteError> {
    let mut rules = Vec::new();
    match &route.spec {
        RouteSpec::Http(spec) => {
            for (i, rule) in spec.rules.iter().enumerate() {
                rules.push(http_rule(state, route, i, rule, port, config, topics)?);
            }
        }
        RouteSpec::Grpc(spec) => {
            let extras = grpc_annotations(route)?;
            for (i, rule) in spec.rules.iter().enumerate() {
                rules.push(grpc_rule(
                    state, route, i, rule, &extras, port, config, topics,
                )?);
            }
        }
    }
    Ok(Compiled { rules })
}

fn route_ref(route: &Route, index: usize, name: &Option<String>) -> pb::RouteRef {
    pb::RouteRef {
        kind: route.kind().as_str().to_ascii_lowercase(),
        namespace: route.meta.key.namespace.clone(),
        name: route.meta.key.name.clone(),
        rule: name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| index.to_string()),
    }
}

fn pb_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn parse_duration(field: &str, value: &str) -> Result<Duration, RouteError> {
    duration::parse(value).map_err(|e| unsupported(format!("{field}: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn http_rule(
    state: &State,
    route: &Route,
    i: usize,
    rule: &HttpRouteRule,
    port: Option<u16>,
    config: &OutboundConfig,
    topics: &mut Vec<Topic>,
) -> Result<CompiledRule, RouteError> {
    let field = format!("spec.rules[{i}]");
    let (matches, all_prefix) = http_matches(&field, rule)?;
    let mut filters = rule_filters(&field, &rule.filters, false, all_prefix)?;
    mirror_backends(
        state,
        route,
        &field,
        &rule.filters,
        &mut filters,
        port,
        false,
        config,
        topics,
    )?;
    let backends = backends(
        state,
        route,
        &field,
        &rule.backend_refs,
        port,
        false,
        config,
        topics,
    )?;
    let mut request_timeout = None;
    let mut backend_request_timeout = None;
    if let Some(t) = &rule.timeouts {
        if let Some(v) = &t.request {
            request_timeout = Some(parse_duration(&format!("{field}.timeouts.request"), v)?);
        }
        if let Some(v) = &t.backend_request {
            backend_request_timeout = Some(parse_duration(
                &format!("{field}.timeouts.backendRequest"),
                v,
            )?);
        }
        if let (Some(r), Some(b)) = (request_timeout, backend_request_timeout) {
            if !r.is_zero() && b > r {
                return Err(unsupported(format!(
                    "{field}.timeouts.backendRequest ({b:?}) is longer than timeouts.request ({r:?})"
                )));
            }
        }
    }
    let retry = match &rule.retry {
        None => None,
        Some(r) => {
            let mut codes = Vec::new();
            for (k, code) in r.codes.iter().enumerate() {
                match u32::try_from(*code) {
                    Ok(c) if (400..=599).contains(&c) => codes.push(c),
                    _ => {
                        return Err(unsupported(format!(
                            "{field}.retry.codes[{k}] is {code}; expected an HTTP status 400-599"
                        )))
                    }
                }
            }
            let attempts = match r.attempts {
                None => DEFAULT_ATTEMPTS,
                Some(a) => u32::try_from(a).ok().filter(|a| *a >= 1).ok_or_else(|| {
                    unsupported(format!("{field}.retry.attempts is {a}; expected 1 or more"))
                })?,
            };
            let backoff = match &r.backoff {
                Some(b) => Some(pb_duration(parse_duration(
                    &format!("{field}.retry.backoff"),
                    b,
                )?)),
                None => None,
            };
            Some(pb::Retry {
                attempts,
                codes,
                grpc_codes: Vec::new(),
                backoff,
            })
        }
    };
    Ok((
        pb::Route {
            r#ref: Some(route_ref(route, i, &rule.name)),
            filters,
            backends,
            request_timeout: request_timeout.map(pb_duration),
            backend_request_timeout: backend_request_timeout.map(pb_duration),
            retry,
        },
        matches,
    ))
}

/// The matches of an HTTPRoute rule with their precedence, and whether
/// every one is a PathPrefix match. `field`: the rule (`spec.rules[i]`).
fn http_matches(field: &str, rule: &HttpRouteRule) -> Result<(Vec<RankedMatch>, bool), RouteError> {
    let mut matches = Vec::new();
    let mut all_prefix = true;
    if rule.matches.is_empty() {
        matches.push((
            vec![0, 1, 0, 0, 0],
            pb::RouteMatch {
                path: Some(path(pb::path_match::Kind::Prefix("/".into()))),
                ..Default::default()
            },
        ));
    }
    for (j, m) in rule.matches.iter().enumerate() {
        let f = format!("{field}.matches[{j}]");
        let (rank, path_match) = http_path(&f, m.path.as_ref())?;
        all_prefix &= matches!(path_match.kind, Some(pb::path_match::Kind::Prefix(_)));
        let headers = header_matches(&format!("{f}.headers"), &m.headers)?;
        let query_params = query_matches(&format!("{f}.queryParams"), &m.query_params)?;
        let method = match m.method.as_deref() {
            None | Some("") => String::new(),
            Some(
                mth @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS"
                | "TRACE" | "PATCH"),
            ) => mth.to_string(),
            Some(other) => {
                return Err(unsupported(format!(
                    "{f}.method is {other:?}; expected GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE or PATCH"
                )))
            }
        };
        let mut specificity = rank;
        specificity.push(usize::from(!method.is_empty()));
        specificity.push(headers.len());
        specificity.push(query_params.len());
        matches.push((
            specificity,
            pb::RouteMatch {
                route: 0,
                path: Some(path_match),
                headers,
                query_params,
                method,
            },
        ));
    }
    Ok((matches, all_prefix))
}

fn path(kind: pb::path_match::Kind) -> pb::PathMatch {
    pb::PathMatch { kind: Some(kind) }
}

/// An HTTP path match and its precedence `[kind, length]` (Exact 2,
/// RegularExpression 1, PathPrefix 0).
fn http_path(
    field: &str,
    m: Option<&crate::model::gateway::HttpPathMatch>,
) -> Result<(Vec<usize>, pb::PathMatch), RouteError> {
    let type_ = m.and_then(|m| m.type_.as_deref()).unwrap_or("PathPrefix");
    let value = m.and_then(|m| m.value.as_deref()).unwrap_or("/");
    let check_path = |v: &str| -> Result<(), RouteError> {
        let bad = if !v.starts_with('/') {
            Some("must start with /")
        } else if v.contains("//") {
            Some("must not contain //")
        } else if v.contains("/./") || v.contains("/../") || v.ends_with("/.") || v.ends_with("/..")
        {
            Some("must not contain . or .. segments")
        } else if v.contains('#') || v.contains('?') || v.to_ascii_lowercase().contains("%2f") {
            Some("must not contain #, ? or %2F")
        } else if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
            Some("must not contain spaces or control characters")
        } else {
            None
        };
        match bad {
            Some(why) => Err(unsupported(format!("{field}.path.value is {v:?}: {why}"))),
            None => Ok(()),
        }
    };
    match type_ {
        "Exact" => {
            check_path(value)?;
            Ok((
                vec![2, value.len()],
                path(pb::path_match::Kind::Exact(value.into())),
            ))
        }
        "PathPrefix" => {
            check_path(value)?;
            let v = if value.len() > 1 {
                value.trim_end_matches('/')
            } else {
                value
            };
            Ok((
                vec![0, v.len()],
                path(pb::path_match::Kind::Prefix(v.into())),
            ))
        }
        "RegularExpression" => {
            check_regex(&format!("{field}.path.value"), value)?;
            Ok((
                vec![1, value.len()],
                path(pb::path_match::Kind::Regex(value.into())),
            ))
        }
        other => Err(unsupported(format!(
            "{field}.path.type is {other:?}; expected Exact, PathPrefix or RegularExpression"
        ))),
    }
}

fn check_regex(field: &str, value: &str) -> Result<(), RouteError> {
    regex::Regex::new(&format!("^(?:{value})$"))
        .map(|_| ())
        .map_err(|e| {
            unsupported(format!(
                "{field} is {value:?}, not a valid regular expression (RE2 syntax): {}",
                e.to_string().lines().last().unwrap_or_default()
            ))
        })
}

fn header_matches(field: &str, ms: &[ValueMatch]) -> Result<Vec<pb::HeaderMatch>, RouteError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (k, m) in ms.iter().enumerate() {
        let name = m.name.to_ascii_lowercase();
        if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(unsupported(format!(
                "{field}[{k}].name is {:?}, not a header name",
                m.name
            )));
        }
        if !seen.insert(name.clone()) {
            continue; // the first of equal names counts
        }
        let value = match value_match(field, k, m)? {
            Matched::Exact(v) => pb::header_match::Value::Exact(v),
            Matched::Regex(v) => pb::header_match::Value::Regex(v),
        };
        out.push(pb::HeaderMatch {
            name,
            value: Some(value),
        });
    }
    Ok(out)
}

/// A header or query parameter match's value: `Exact` (the default) or a checked
/// `RegularExpression`; `field[k]` names it in errors.
enum Matched {
    Exact(String),
    Regex(String),
}

fn value_match(field: &str, k: usize, m: &ValueMatch) -> Result<Matched, RouteError> {
    match m.type_.as_deref().unwrap_or("Exact") {
        "Exact" => Ok(Matched::Exact(m.value.clone())),
        "RegularExpression" => {
            check_regex(&format!("{field}[{k}].value"), &m.value)?;
            Ok(Matched::Regex(m.value.clone()))
        }
        other => Err(unsupported(format!(
            "{field}[{k}].type is {other:?}; expected Exact or RegularExpression"
        ))),
    }
}

fn query_matches(field: &str, ms: &[ValueMatch]) -> Result<Vec<pb::QueryParamMatch>, RouteError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (k, m) in ms.iter().enumerate() {
        if m.name.is_empty() {
            return Err(unsupported(format!("{field}[{k}].name is empty")));
        }
        if !seen.insert(m.name.clone()) {
            continue;
        }
        let value = match value_match(field, k, m)? {
            Matched::Exact(v) => pb::query_param_match::Value::Exact(v),
            Matched::Regex(v) => pb::query_param_match::Value::Regex(v),
        };
        out.push(pb::QueryParamMatch {
            name: m.name.clone(),
            value: Some(value),
        });
    }
    Ok(out)
}

fn header_modifier(
    field: &str,
    h: Option<&HeaderFilter>,
) -> Result<pb::HeaderModifier, RouteError> {
    let Some(h) = h else {
        return Err(unsupported(format!("{field} is missing")));
    };
    let header = |list: &str, k: usize, name: &str, value: &str| {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(unsupported(format!(
                "{field}.{list}[{k}].name is {name:?}, not a header name"
            )));
        }
        if http::HeaderValue::from_str(value).is_err() {
            return Err(unsupported(format!(
                "{field}.{list}[{k}].value is {value:?}, not a header value"
            )));
        }
        Ok(pb::Header {
            name: name.to_string(),
            value: value.to_string(),
        })
    };
    Ok(pb::HeaderModifier {
        set: h
            .set
            .iter()
            .enumerate()
            .map(|(k, x)| header("set", k, &x.name, &x.value))
            .collect::<Result<_, _>>()?,
        add: h
            .add
            .iter()
            .enumerate()
            .map(|(k, x)| header("add", k, &x.name, &x.value))
            .collect::<Result<_, _>>()?,
        remove: h.remove.clone(),
    })
}

fn path_modifier(
    field: &str,
    p: &PathModifier,
    all_prefix: bool,
) -> Result<pb::PathModifier, RouteError> {
    let kind = match (
        p.type_.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(v), _) => pb::path_modifier::Kind::Full(v.clone()),
        ("ReplacePrefixMatch", _, Some(v)) => {
            if !all_prefix {
                return Err(incompatible(format!(
                    "{field}: ReplacePrefixMatch needs every match of the rule to be a PathPrefix match"
                )));
            }
            pb::path_modifier::Kind::Prefix(v.clone())
        }
        ("ReplaceFullPath", None, _) => {
            return Err(unsupported(format!("{field}.replaceFullPath is missing")))
        }
        ("ReplacePrefixMatch", _, None) => {
            return Err(unsupported(format!(
                "{field}.replacePrefixMatch is missing"
            )))
        }
        (other, _, _) => {
            return Err(unsupported(format!(
                "{field}.type is {other:?}; expected ReplaceFullPath or ReplacePrefixMatch"
            )))
        }
    };
    Ok(pb::PathModifier { kind: Some(kind) })
}

/// Converts filters. `grpc`: a GRPCRoute (header modifiers only).
/// `backend`: a backendRef's filters (header modifiers only).
fn convert_filter(
    field: &str,
    f: &RouteFilter,
    header_only: bool,
    kind_name: &str,
    all_prefix: bool,
    rule: bool,
) -> Result<pb::Filter, RouteError> {
    use pb::filter::Kind as F;
    let kind = match f.type_.as_str() {
        // The backend is resolved by the caller ([`mirror_backends`]), which has the index.
        "RequestMirror" if rule => {
            let Some(m) = &f.request_mirror else {
                return Err(unsupported(format!("{field}.requestMirror is missing")));
            };
            let (numerator, denominator) = mirror_share(&format!("{field}.requestMirror"), m)?;
            F::RequestMirror(pb::RequestMirror {
                backend: None,
                numerator,
                denominator,
            })
        }
        "RequestHeaderModifier" => F::RequestHeaderModifier(header_modifier(
            &format!("{field}.requestHeaderModifier"),
            f.request_header_modifier.as_ref(),
        )?),
        "ResponseHeaderModifier" => F::ResponseHeaderModifier(header_modifier(
            &format!("{field}.responseHeaderModifier"),
            f.response_header_modifier.as_ref(),
        )?),
        "RequestRedirect" if !header_only => {
            let Some(r) = &f.request_redirect else {
                return Err(unsupported(format!("{field}.requestRedirect is missing")));
            };
            let scheme = match r.scheme.as_deref() {
                None | Some("") => String::new(),
                Some(s @ ("http" | "https")) => s.to_string(),
                Some(other) => {
                    return Err(unsupported(format!(
                        "{field}.requestRedirect.scheme is {other:?}; expected http or https"
                    )))
                }
            };
            let status = match r.status_code {
                None => 302,
                Some(c @ (301 | 302 | 303 | 307 | 308)) => c.unsigned_abs(),
                Some(other) => {
                    return Err(unsupported(format!(
                        "{field}.requestRedirect.statusCode is {other}; expected 301, 302, 303, 307 or 308"
                    )))
                }
            };
            let port = match r.port {
                None => 0,
                Some(p) => u16::try_from(p)
                    .ok()
                    .filter(|p| *p > 0)
                    .map(u32::from)
                    .ok_or_else(|| {
                        unsupported(format!(
                            "{field}.requestRedirect.port is {p}; expected 1-65535"
                        ))
                    })?,
            };
            F::RequestRedirect(pb::RequestRedirect {
                scheme,
                hostname: r.hostname.clone().unwrap_or_default(),
                port,
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_modifier(&format!("{field}.requestRedirect.path"), p, all_prefix))
                    .transpose()?,
                status,
            })
        }
        "URLRewrite" if !header_only => {
            let Some(r) = &f.url_rewrite else {
                return Err(unsupported(format!("{field}.urlRewrite is missing")));
            };
            F::UrlRewrite(pb::UrlRewrite {
                hostname: r.hostname.clone().unwrap_or_default(),
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_modifier(&format!("{field}.urlRewrite.path"), p, all_prefix))
                    .transpose()?,
            })
        }
        other @ ("CORS" | "ExternalAuth" | "ExtensionRef") => {
            return Err(unsupported(format!(
                "{field}.type is {other}: Weft does not implement this filter"
            )))
        }
        other => {
            return Err(unsupported(format!(
                "{field}.type is {other:?}, not a filter {kind_name} supports here"
            )))
        }
    };
    Ok(pb::Filter { kind: Some(kind) })
}

/// A RequestMirror's share as numerator / denominator (`percent` is n/100).
fn mirror_share(field: &str, m: &RequestMirrorFilter) -> Result<(u32, u32), RouteError> {
    let share = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err(unsupported(format!(
                "{field} sets both percent and fraction; set at most one"
            )))
        }
        (None, None) => (1, 1),
        (Some(p), None) => (p, 100),
        (None, Some(f)) => (f.numerator, f.denominator.unwrap_or(100)),
    };
    match share {
        (n, d) if d > 0 && (0..=d).contains(&n) => Ok((n.unsigned_abs(), d.unsigned_abs())),
        (n, d) => Err(unsupported(format!(
            "{field} mirrors {n}/{d} of the requests; expected a share between 0 and 1 with a positive denominator"
        ))),
    }
}

/// Resolves the backend of each RequestMirror among `out` (converted from `src`), as
/// backendRefs are resolved: a Service that does not exist mirrors nothing.
#[allow(clippy::too_many_arguments)]
fn mirror_backends(
    state: &State,
    route: &Route,
    field: &str,
    src: &[RouteFilter],
    out: &mut [pb::Filter],
    port: Option<u16>,
    grpc: bool,
    config: &OutboundConfig,
    topics: &mut Vec<Topic>,
) -> Result<(), RouteError> {
    for (k, (f, pb_filter)) in src.iter().zip(out.iter_mut()).enumerate() {
        let (Some(m), Some(pb::filter::Kind::RequestMirror(mirror))) =
            (&f.request_mirror, pb_filter.kind.as_mut())
        else {
            continue;
        };
        let backend_ref = BackendRef {
            weight: None,
            filters: Vec::new(),
            ..m.backend_ref.clone()
        };
        mirror.backend = backends(
            state,
            route,
            &format!("{field}.filters[{k}].requestMirror"),
            std::slice::from_ref(&backend_ref),
            port,
            grpc,
            config,
            topics,
        )?
        .pop();
    }
    Ok(())
}

fn rule_filters(
    field: &str,
    filters: &[RouteFilter],
    grpc: bool,
    all_prefix: bool,
) -> Result<Vec<pb::Filter>, RouteError> {
    let kind_name = if grpc { "GRPCRoute" } else { "HTTPRoute" };
    let out: Vec<pb::Filter> = filters
        .iter()
        .enumerate()
        .map(|(k, f)| {
            convert_filter(
                &format!("{field}.filters[{k}]"),
                f,
                grpc,
                kind_name,
                all_prefix,
                true,
            )
        })
        .collect::<Result<_, _>>()?;
    let count = |want: fn(&pb::filter::Kind) -> bool| {
        out.iter()
            .filter(|f| f.kind.as_ref().is_some_and(want))
            .count()
    };
    let redirects = count(|k| matches!(k, pb::filter::Kind::RequestRedirect(_)));
    let rewrites = count(|k| matches!(k, pb::filter::Kind::UrlRewrite(_)));
    if redirects > 0 && rewrites > 0 {
        return Err(incompatible(format!(
            "{field}.filters has both RequestRedirect and URLRewrite"
        )));
    }
    if redirects > 1 || rewrites > 1 {
        return Err(incompatible(format!(
            "{field}.filters has more than one RequestRedirect or URLRewrite"
        )));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn backends(
    state: &State,
    route: &Route,
    field: &str,
    refs: &[BackendRef],
    port: Option<u16>,
    grpc: bool,
    config: &OutboundConfig,
    topics: &mut Vec<Topic>,
) -> Result<Vec<pb::Backend>, RouteError> {
    let mut out = Vec::new();
    for (k, b) in refs.iter().enumerate() {
        let f = format!("{field}.backendRefs[{k}]");
        let weight = match b.weight {
            None => 1,
            Some(w) => u32::try_from(w)
                .ok()
                .filter(|w| *w <= 1_000_000)
                .ok_or_else(|| unsupported(format!("{f}.weight is {w}; expected 0-1000000")))?,
        };
        let filters = b
            .filters
            .iter()
            .enumerate()
            .map(|(j, x)| {
                convert_filter(
                    &format!("{f}.filters[{j}]"),
                    x,
                    true,
                    if grpc { "GRPCRoute" } else { "HTTPRoute" },
                    false,
                    false,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (kind, settings) = match resolve_backend(state, route, b, port, topics) {
            Ok((_, None)) => (
                pb::backend::Kind::Invalid(format!("{f}: no port (required for a Service)")),
                None,
            ),
            Ok((svc, Some(p))) => {
                let (settings, source) = settings_for(state, svc, p);
                (
                    pb::backend::Kind::Target(format!(
                        "{}.{}.svc.{}:{p}",
                        svc.key.name,
                        svc.key.namespace,
                        config.cluster_domain.trim_end_matches('.')
                    )),
                    Some(backend_settings_pb(&settings, &source)),
                )
            }
            Err(problem) => (
                pb::backend::Kind::Invalid(format!("{f}: {}", problem.message)),
                None,
            ),
        };
        out.push(pb::Backend {
            kind: Some(kind),
            weight,
            filters,
            settings,
        });
    }
    Ok(out)
}

/// The Service and port a backendRef names, or why it cannot be used.
/// The port is `None` only when neither the backendRef nor the caller
/// gives one (a status check of a parentRef without port).
fn resolve_backend<'a>(
    state: &'a State,
    route: &Route,
    b: &BackendRef,
    port: Option<u16>,
    topics: &mut Vec<Topic>,
) -> Result<(&'a Service, Option<u16>), BackendProblem> {
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        return Err(BackendProblem {
            reason: "InvalidKind",
            message: format!(
                "backendRef {:?} has group {group:?} kind {kind:?}; Weft routes to core Services only",
                b.name
            ),
        });
    }
    let ns = b
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| route.meta.key.namespace.clone());
    let key = ObjectKey::new(ns, b.name.clone());
    topics.push(Topic::Service(key.clone()));
    topics.push(Topic::Policy(key.clone()));
    let Some(svc) = state.services.get(&key) else {
        return Err(BackendProblem {
            reason: "BackendNotFound",
            message: format!("service {key} not found"),
        });
    };
    let p = match b.port {
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or(BackendProblem {
                reason: "BackendNotFound",
                message: format!("backendRef {key} port {p} is not a port number"),
            })?,
        None => match port {
            Some(p) => p,
            None => return Ok((svc, None)),
        },
    };
    if svc.port(p).is_none() && !(svc.headless && svc.ports.is_empty()) {
        return Err(BackendProblem {
            reason: "BackendNotFound",
            message: format!("service {key} has no TCP port {p}"),
        });
    }
    Ok((svc, Some(p)))
}

/// What a GRPCRoute's annotations add to each of its rules.
#[derive(Default)]
struct GrpcExtras {
    retry: Option<pb::Retry>,
    request_timeout: Option<Duration>,
    backend_request_timeout: Option<Duration>,
}

/// gRPC status codes by name (`unavailable`, `DEADLINE_EXCEEDED`,
/// `deadline-exceeded` all work) or number.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "ok",
        "cancelled",
        "unknown",
        "invalid-argument",
        "deadline-exceeded",
        "not-found",
        "already-exists",
        "permission-denied",
        "resource-exhausted",
        "failed-precondition",
        "aborted",
        "out-of-range",
        "unimplemented",
        "internal",
        "unavailable",
        "data-loss",
        "unauthenticated",
    ];
    let n = name.trim().to_ascii_lowercase().replace('_', "-");
    if let Ok(code) = n.parse::<u32>() {
        return (code < 17).then_some(code);
    }
    let n = if n == "canceled" {
        "cancelled".into()
    } else {
        n
    };
    NAMES
        .iter()
        .position(|c| *c == n)
        .and_then(|i| u32::try_from(i).ok())
}

fn grpc_annotations(route: &Route) -> Result<GrpcExtras, RouteError> {
    let a = &route.annotations;
    let field = |k: &str| format!("metadata.annotations[{k:?}]");
    let mut extras = GrpcExtras::default();
    let codes = match a.get(GRPC_CODES_ANNOTATION) {
        None => None,
        Some(v) => {
            let mut codes = Vec::new();
            for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                codes.push(grpc_code(part).ok_or_else(|| {
                    unsupported(format!(
                        "{} has {part:?}, not a gRPC status code (names like unavailable, deadline-exceeded, or numbers 0-16)",
                        field(GRPC_CODES_ANNOTATION)
                    ))
                })?);
            }
            Some(codes)
        }
    };
    let attempts = match a.get(ATTEMPTS_ANNOTATION) {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| {
                    unsupported(format!(
                        "{} is {v:?}; expected a number of retries, 1 or more",
                        field(ATTEMPTS_ANNOTATION)
                    ))
                })?,
        ),
    };
    let backoff = a
        .get(BACKOFF_ANNOTATION)
        .map(|v| parse_duration(&field(BACKOFF_ANNOTATION), v))
        .transpose()?;
    if codes.is_some() || attempts.is_some() {
        extras.retry = Some(pb::Retry {
            attempts: attempts.unwrap_or(DEFAULT_ATTEMPTS),
            codes: Vec::new(),
            grpc_codes: codes.unwrap_or_default(),
            backoff: backoff.map(pb_duration),
        });
    }
    extras.request_timeout = a
        .get(REQUEST_TIMEOUT_ANNOTATION)
        .map(|v| parse_duration(&field(REQUEST_TIMEOUT_ANNOTATION), v))
        .transpose()?;
    extras.backend_request_timeout = a
        .get(BACKEND_REQUEST_TIMEOUT_ANNOTATION)
        .map(|v| parse_duration(&field(BACKEND_REQUEST_TIMEOUT_ANNOTATION), v))
        .transpose()?;
    Ok(extras)
}

#[allow(clippy::too_many_arguments)]
fn grpc_rule(
    state: &State,
    route: &Route,
    i: usize,
    rule: &GrpcRouteRule,
    extras: &GrpcExtras,
    port: Option<u16>,
    config: &OutboundConfig,
    topics: &mut Vec<Topic>,
) -> Result<CompiledRule, RouteError> {
    let field = format!("spec.rules[{i}]");
    let matches = grpc_matches(&field, rule)?;
    let mut filters = rule_filters(&field, &rule.filters, true, false)?;
    mirror_backends(
        state,
        route,
        &field,
        &rule.filters,
        &mut filters,
        port,
        true,
        config,
        topics,
    )?;
    let backends = backends(
        state,
        route,
        &field,
        &rule.backend_refs,
        port,
        true,
        config,
        topics,
    )?;
    Ok((
        pb::Route {
            r#ref: Some(route_ref(route, i, &rule.name)),
            filters,
            backends,
            request_timeout: extras.request_timeout.map(pb_duration),
            backend_request_timeout: extras.backend_request_timeout.map(pb_duration),
            retry: extras.retry.clone(),
        },
        matches,
    ))
}

/// The matches of a GRPCRoute rule with their precedence (method matches
/// become path matches). `field`: the rule (`spec.rules[i]`).
fn grpc_matches(field: &str, rule: &GrpcRouteRule) -> Result<Vec<RankedMatch>, RouteError> {
    let mut matches = Vec::new();
    if rule.matches.is_empty() {
        matches.push((vec![0, 0, 0], pb::RouteMatch::default()));
    }
    for (j, m) in rule.matches.iter().enumerate() {
        let f = format!("{field}.matches[{j}]");
        let (service_len, method_len, path_match) = match &m.method {
            None => (0, 0, None),
            Some(mm) => {
                let service = mm.service.as_deref().filter(|s| !s.is_empty());
                let method = mm.method.as_deref().filter(|s| !s.is_empty());
                let lens = (service.map_or(0, str::len), method.map_or(0, str::len));
                let kind = match (mm.type_.as_deref().unwrap_or("Exact"), service, method) {
                    (_, None, None) => {
                        return Err(unsupported(format!(
                            "{f}.method needs a service or a method"
                        )))
                    }
                    ("Exact", s, m) => {
                        for (name, v) in [("service", s), ("method", m)] {
                            if let Some(v) = v {
                                if v.contains('/') || v.chars().any(char::is_whitespace) {
                                    return Err(unsupported(format!(
                                        "{f}.method.{name} is {v:?}: an Exact {name} must not contain / or spaces"
                                    )));
                                }
                            }
                        }
                        match (s, m) {
                            (Some(s), Some(m)) => pb::path_match::Kind::Exact(format!("/{s}/{m}")),
                            (Some(s), None) => pb::path_match::Kind::Prefix(format!("/{s}")),
                            (None, Some(m)) => {
                                pb::path_match::Kind::Regex(format!("/[^/]+/{}", regex::escape(m)))
                            }
                            (None, None) => unreachable!("checked above"),
                        }
                    }
                    ("RegularExpression", s, m) => {
                        if let Some(s) = s {
                            check_regex(&format!("{f}.method.service"), s)?;
                        }
                        if let Some(m) = m {
                            check_regex(&format!("{f}.method.method"), m)?;
                        }
                        pb::path_match::Kind::Regex(format!(
                            "/(?:{})/(?:{})",
                            s.unwrap_or("[^/]+"),
                            m.unwrap_or("[^/]+")
                        ))
                    }
                    (other, _, _) => {
                        return Err(unsupported(format!(
                            "{f}.method.type is {other:?}; expected Exact or RegularExpression"
                        )))
                    }
                };
                (lens.0, lens.1, Some(path(kind)))
            }
        };
        let headers = header_matches(&format!("{f}.headers"), &m.headers)?;
        matches.push((
            vec![service_len, method_len, headers.len()],
            pb::RouteMatch {
                route: 0,
                path: path_match,
                headers,
                query_params: Vec::new(),
                method: String::new(),
            },
        ));
    }
    Ok(matches)
}

/// How specific a targetRef is for `svc`:`port`: `Some(1)` names the
/// port, `Some(0)` the whole service, `None` does not apply.
fn target_specificity(p: &Policy, svc: &Service, port: u16) -> Option<u8> {
    p.spec
        .target_refs
        .iter()
        .filter(|t| matches!(t.group.as_str(), "" | "core") && t.kind == "Service")
        .filter(|t| t.name == svc.key.name && p.meta.key.namespace == svc.key.namespace)
        .filter_map(|t| {
            let section = t.section_name.as_deref().filter(|s| !s.is_empty());
            match (section, t.port) {
                (None, None) => Some(0),
                (s, n) => {
                    let sp = svc.port(port);
                    let name_ok = s.is_none_or(|s| sp.and_then(|x| x.name.as_deref()) == Some(s));
                    let port_ok = n.is_none_or(|n| n == i32::from(port));
                    (name_ok && port_ok).then_some(1)
                }
            }
        })
        .max()
}

fn policy_order(a: &Policy, b: &Policy) -> Ordering {
    (a.meta.created.is_none(), &a.meta.created, &a.meta.key.name).cmp(&(
        b.meta.created.is_none(),
        &b.meta.created,
        &b.meta.key.name,
    ))
}

/// The policy that wins for `svc`:`port` (valid ones only).
fn winning_policy<'a>(
    state: &'a State,
    svc: &Service,
    port: u16,
) -> Option<(&'a Policy, Settings)> {
    let mut candidates: Vec<(u8, &Policy, Settings)> = state
        .policies_by_target
        .get(&svc.key)
        .into_iter()
        .flatten()
        .filter_map(|k| {
            state
                .policies
                .get(&ObjectKey::new(svc.key.namespace.clone(), k.name.clone()))
        })
        .filter_map(|p| {
            let spec = target_specificity(p, svc, port)?;
            let settings = policy::settings(&p.spec).ok()?;
            Some((spec, p.as_ref(), settings))
        })
        .collect();
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| policy_order(a.1, b.1)));
    candidates.into_iter().next().map(|(_, p, s)| (p, s))
}

/// The settings of `svc`:`port` and where they come from.
fn settings_for(state: &State, svc: &Service, port: u16) -> (Settings, String) {
    match winning_policy(state, svc, port) {
        Some((p, s)) => (
            s,
            format!("backendpolicy/{}/{}", p.meta.key.namespace, p.meta.key.name),
        ),
        None => (Settings::default(), "default".into()),
    }
}

fn backend_settings_pb(s: &Settings, source: &str) -> pb::BackendSettings {
    pb::BackendSettings {
        budget: Some(pb::RetryBudget {
            retry_ratio: s.retry_ratio,
            min_retries_per_second: s.min_retries_per_second,
            ttl: Some(pb_duration(s.retry_ttl)),
        }),
        breaker: Some(pb::CircuitBreaker {
            consecutive_failures: s.consecutive_failures,
            base_ejection: Some(pb_duration(s.base_ejection)),
            max_ejection: Some(pb_duration(s.max_ejection)),
            jitter: s.jitter,
            max_concurrent_requests: s.max_concurrent_requests,
            max_pending_requests: s.max_pending_requests,
        }),
        connect_timeout: Some(pb_duration(s.connect_timeout)),
        idle_timeout: Some(pb_duration(s.idle_timeout)),
        request_timeout: s.request_timeout.map(pb_duration),
        source: source.to_string(),
    }
}

/// A Gateway API condition verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

impl Verdict {
    fn yes(reason: &str, message: impl Into<String>) -> Self {
        Verdict {
            ok: true,
            reason: reason.into(),
            message: message.into(),
        }
    }
    fn no(reason: &str, message: impl Into<String>) -> Self {
        Verdict {
            ok: false,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// The verdicts for one Service parentRef of a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentVerdict {
    pub parent_ref: ParentReference,
    pub accepted: Verdict,
    pub resolved_refs: Verdict,
}

/// `Accepted` and `ResolvedRefs` for each Service parentRef of `route`
/// (parentRefs of other kinds are not Weft's to answer).
pub fn route_verdicts(state: &State, route: &Route, config: &OutboundConfig) -> Vec<ParentVerdict> {
    let mut out = Vec::new();
    for p in route.parent_refs().iter().filter(|p| p.is_service()) {
        let ns = p
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| route.meta.key.namespace.clone());
        let key = ObjectKey::new(ns, p.name.clone());
        let port = p.port.and_then(|n| u16::try_from(n).ok());
        let mut ignored = Vec::new();
        let resolved_refs = resolved_refs(state, route, port);
        let accepted = match state.services.get(&key) {
            None => Verdict::no("NoMatchingParent", format!("service {key} not found")),
            Some(svc) => {
                let port_ok = p.port.is_none() || port.is_some_and(|n| svc.port(n).is_some());
                let section_ok = p.section_name.as_deref().is_none_or(|s| {
                    s.is_empty() || svc.ports.iter().any(|sp| sp.name.as_deref() == Some(s))
                });
                if !port_ok {
                    Verdict::no(
                        "NoMatchingParent",
                        format!(
                            "service {key} has no TCP port {}",
                            p.port.unwrap_or_default()
                        ),
                    )
                } else if !section_ok {
                    Verdict::no(
                        "NoMatchingParent",
                        format!(
                            "service {key} has no port named {:?}",
                            p.section_name.as_deref().unwrap_or_default()
                        ),
                    )
                } else {
                    match compile_route(state, route, port, config, &mut ignored) {
                        Err(e) => Verdict::no(
                            e.reason,
                            match held_note(state, route) {
                                Some(note) => format!("{}; {note}", e.message),
                                None => e.message,
                            },
                        ),
                        Ok(_) => match conflicting_grpc_route(state, route, svc, p) {
                            Some(other) => Verdict::no(
                                "Conflicted",
                                format!("GRPCRoute {other} is attached to the same service port and takes precedence over HTTPRoutes (GEP-1294)"),
                            ),
                            None => Verdict::yes("Accepted", "route accepted by Weft"),
                        },
                    }
                }
            }
        };
        out.push(ParentVerdict {
            parent_ref: p.clone(),
            accepted,
            resolved_refs,
        });
    }
    out
}

/// Why `route` cannot be applied whatever else the cluster holds (a bad
/// regex or path, an unsupported filter or value: what makes it
/// `Accepted=False` with `UnsupportedValue` or `IncompatibleFilters`), or
/// `None`. A backendRef that does not resolve is not such a problem (its
/// share is answered 500), nor is a parentRef to a missing Service. For a
/// route whose only parents are Servers (an inbound route), its matches
/// alone count, since only they apply there. The index keeps the last
/// version without a problem in force ([`State::held_routes`]).
pub fn route_problem(route: &Route) -> Option<RouteError> {
    if route.parent_services().next().is_none() && route.parent_servers().next().is_some() {
        return rule_matches(route).err();
    }
    compile_route(
        &State::default(),
        route,
        None,
        &OutboundConfig::default(),
        &mut Vec::new(),
    )
    .err()
}

/// When `route` (a latest version that cannot be applied) has an earlier
/// accepted version still in force: the words that say so in its status.
pub fn held_note(state: &State, route: &Route) -> Option<String> {
    let held = state
        .held_routes
        .get(&(route.kind(), route.meta.key.clone()))?;
    if **held == *route {
        return None;
    }
    Some(match held.meta.generation {
        Some(g) => format!(
            "the last accepted version (generation {g}) stays in force until the route is fixed or deleted"
        ),
        None => "the last accepted version stays in force until the route is fixed or deleted"
            .to_string(),
    })
}

/// For an HTTPRoute: a valid GRPCRoute in the same namespace on the same
/// service with an overlapping port.
fn conflicting_grpc_route(
    state: &State,
    route: &Route,
    svc: &Service,
    p: &ParentReference,
) -> Option<ObjectKey> {
    if route.kind() != Kind::HttpRoute {
        return None;
    }
    let ports: Vec<u16> = match p.port.and_then(|n| u16::try_from(n).ok()) {
        Some(n) => vec![n],
        None => svc.ports.iter().map(|sp| sp.port).collect(),
    };
    for (kind, key) in state.routes_by_parent.get(&svc.key).into_iter().flatten() {
        if *kind != Kind::GrpcRoute || key.namespace != route.meta.key.namespace {
            continue;
        }
        let Some(other) = state.route_in_force(*kind, key) else {
            continue;
        };
        let overlaps = ports.iter().any(|port| {
            other
                .parent_refs()
                .iter()
                .any(|op| parent_matches(other, op, svc, Some(*port)))
        });
        if overlaps
            && compile_route(
                state,
                other,
                None,
                &OutboundConfig::default(),
                &mut Vec::new(),
            )
            .is_ok()
        {
            return Some(key.clone());
        }
    }
    None
}

fn resolved_refs(state: &State, route: &Route, port: Option<u16>) -> Verdict {
    // A RequestMirror's backendRef counts too (the Gateway API's ResolvedRefs covers every
    // reference a route makes).
    let (backend_refs, filters): (Vec<&BackendRef>, Vec<&RouteFilter>) = match &route.spec {
        RouteSpec::Http(s) => (
            s.rules.iter().flat_map(|r| &r.backend_refs).collect(),
            s.rules.iter().flat_map(|r| &r.filters).collect(),
        ),
        RouteSpec::Grpc(s) => (
            s.rules.iter().flat_map(|r| &r.backend_refs).collect(),
            s.rules.iter().flat_map(|r| &r.filters).collect(),
        ),
    };
    let refs = backend_refs.into_iter().chain(
        filters
            .into_iter()
            .filter_map(|f| f.request_mirror.as_ref().map(|m| &m.backend_ref)),
    );
    let problems: Vec<BackendProblem> = refs
        .into_iter()
        .filter_map(|b| resolve_backend(state, route, b, port, &mut Vec::new()).err())
        .collect();
    match problems.first() {
        None => Verdict::yes("ResolvedRefs", "all backendRefs resolved"),
        Some(first) => Verdict::no(
            first.reason,
            problems
                .iter()
                .map(|p| p.message.as_str())
                .collect::<Vec<_>>()
                .join("; "),
        ),
    }
}

/// `Accepted` per targetRef of a BackendPolicy: `TargetNotFound`,
/// `Invalid` (a field that does not parse; the defaults apply instead),
/// `Conflicted` (another policy with an equally specific targetRef is
/// older, or sorts first by name) or `Accepted`.
pub fn policy_verdicts(state: &State, p: &Policy) -> Vec<(ParentReference, Verdict)> {
    let invalid = policy::settings(&p.spec).err();
    let mut out = Vec::new();
    for t in &p.spec.target_refs {
        let ancestor = ParentReference {
            group: Some(t.group.clone()),
            kind: Some(t.kind.clone()),
            namespace: Some(p.meta.key.namespace.clone()),
            name: t.name.clone(),
            section_name: t.section_name.clone(),
            port: t.port,
        };
        let key = ObjectKey::new(p.meta.key.namespace.clone(), t.name.clone());
        let verdict = if !(matches!(t.group.as_str(), "" | "core") && t.kind == "Service") {
            Verdict::no(
                "Invalid",
                format!(
                    "targetRef group {:?} kind {:?}: a BackendPolicy targets core Services",
                    t.group, t.kind
                ),
            )
        } else if let Some(e) = &invalid {
            Verdict::no("Invalid", e.to_string())
        } else {
            match state.services.get(&key) {
                None => Verdict::no("TargetNotFound", format!("service {key} not found")),
                Some(svc) => {
                    let ports: Vec<u16> = svc
                        .ports
                        .iter()
                        .filter(|sp| {
                            t.port.is_none_or(|n| i32::from(sp.port) == n)
                                && t.section_name
                                    .as_deref()
                                    .is_none_or(|s| sp.name.as_deref() == Some(s))
                        })
                        .map(|sp| sp.port)
                        .collect();
                    if ports.is_empty() && (t.port.is_some() || t.section_name.is_some()) {
                        Verdict::no("TargetNotFound", format!("service {key} has no such port"))
                    } else {
                        let lost: Vec<String> = ports
                            .iter()
                            .filter_map(|port| {
                                let (w, _) = winning_policy(state, svc, *port)?;
                                (w.meta.key != p.meta.key).then(|| {
                                    format!("port {port}: backendpolicy {} applies", w.meta.key)
                                })
                            })
                            .collect();
                        if !ports.is_empty() && lost.len() == ports.len() {
                            Verdict::no("Conflicted", lost.join("; "))
                        } else {
                            Verdict::yes("Accepted", "policy accepted by Weft")
                        }
                    }
                }
            }
        };
        out.push((ancestor, verdict));
    }
    out
}

#[cfg(test)]
mod tests;
