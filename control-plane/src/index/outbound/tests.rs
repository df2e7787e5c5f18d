//! Tables for the compilation, with fixtures written as the manifests a
//! user would apply (parsed by the directory source's loader). The cases
//! follow the Gateway API mesh conformance tests (`conformance/tests/mesh/`).

use std::path::Path;

use super::*;
use crate::index::{Change, Index};
use crate::model::names::parse_target;
use crate::source::dir::load_manifests;

/// Services of the conformance suite: echo, echo-v1, echo-v2 in `mesh`
/// (ports 80 http, 8080 http-alt, 7070 grpc), plus `other` in `consumer`.
const SERVICES: &str = "
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}, {name: http-alt, port: 8080}, {name: grpc, port: 7070}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: mesh}
spec: {clusterIP: 10.96.0.11, ports: [{name: http, port: 80, targetPort: 8080}, {name: http-alt, port: 8080}, {name: grpc, port: 7070}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: mesh}
spec: {clusterIP: 10.96.0.12, ports: [{name: http, port: 80, targetPort: 8080}, {name: http-alt, port: 8080}, {name: grpc, port: 7070}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: consumer}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80}]}
";

fn index(yaml: &str) -> Index {
    let text = format!("{SERVICES}---\n{yaml}");
    let loaded = load_manifests(Path::new("test.yaml"), &text).expect("fixture parses");
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    let index = Index::new();
    index.apply(loaded.objects.into_iter().map(Change::Upsert));
    index
}

fn policy(index: &Index, target: &str, caller: &str) -> pb::OutboundPolicy {
    let t = parse_target(target, caller, "cluster.local").expect("target");
    outbound_policy(&index.read(), &t, caller, &OutboundConfig::default()).0
}

fn render_path(p: &Option<pb::PathMatch>) -> String {
    match p.as_ref().and_then(|p| p.kind.as_ref()) {
        None => "*".into(),
        Some(pb::path_match::Kind::Exact(v)) => format!("={v}"),
        Some(pb::path_match::Kind::Prefix(v)) => format!("{v}*"),
        Some(pb::path_match::Kind::Regex(v)) => format!("~{v}"),
    }
}

fn render_backend(b: &pb::Backend) -> String {
    let what = match &b.kind {
        Some(pb::backend::Kind::Target(t)) => t.clone(),
        Some(pb::backend::Kind::Invalid(m)) => format!("invalid({m})"),
        None => "none".into(),
    };
    format!("{what}@{}", b.weight)
}

/// One line per match, in order: `path [method] [h:name=v] [q:name=v] ->
/// rule-ref backends`.
fn render(p: &pb::OutboundPolicy) -> Vec<String> {
    p.matches
        .iter()
        .map(|m| {
            let route = &p.routes[m.route as usize];
            let r = route.r#ref.clone().unwrap_or_default();
            let mut parts = vec![render_path(&m.path)];
            if !m.method.is_empty() {
                parts.push(m.method.clone());
            }
            for h in &m.headers {
                let v = match &h.value {
                    Some(pb::header_match::Value::Exact(v)) => format!("={v}"),
                    Some(pb::header_match::Value::Regex(v)) => format!("~{v}"),
                    None => String::new(),
                };
                parts.push(format!("h:{}{v}", h.name));
            }
            for q in &m.query_params {
                let v = match &q.value {
                    Some(pb::query_param_match::Value::Exact(v)) => format!("={v}"),
                    Some(pb::query_param_match::Value::Regex(v)) => format!("~{v}"),
                    None => String::new(),
                };
                parts.push(format!("q:{}{v}", q.name));
            }
            let backends: Vec<String> = route.backends.iter().map(render_backend).collect();
            format!(
                "{} -> {}/{}/{}/{} {}",
                parts.join(" "),
                r.kind,
                r.namespace,
                r.name,
                r.rule,
                backends.join(",")
            )
        })
        .collect()
}

fn http_route(ns: &str, name: &str, parent: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{rules}\n"
    )
}

const V1: &str = "echo-v1.mesh.svc.cluster.local";
const V2: &str = "echo-v2.mesh.svc.cluster.local";

#[test]
fn no_routes_is_the_default_policy_with_default_settings() {
    let idx = index("");
    let p = policy(&idx, "echo.mesh:80", "mesh");
    assert_eq!(
        p.service,
        Some(pb::ServiceRef {
            namespace: "mesh".into(),
            name: "echo".into(),
            port: 80
        })
    );
    assert!(p.routes.is_empty() && p.matches.is_empty());
    assert_eq!(p.source, "default");
    let s = p.settings.expect("settings");
    assert_eq!(s.source, "default");
    let budget = s.budget.expect("budget");
    assert_eq!(
        (budget.retry_ratio, budget.min_retries_per_second),
        (0.2, 10)
    );
    assert_eq!(budget.ttl.map(|d| d.seconds), Some(10));
    let breaker = s.breaker.expect("breaker");
    assert_eq!(breaker.consecutive_failures, 7);
    assert_eq!(breaker.base_ejection.map(|d| d.seconds), Some(1));
    assert_eq!(breaker.max_ejection.map(|d| d.seconds), Some(60));
    assert_eq!(breaker.jitter, 0.1);
    assert_eq!(s.connect_timeout.map(|d| d.seconds), Some(1));
}

#[test]
fn targets_that_name_no_service_port_get_no_service() {
    let idx = index(&http_route(
        "mesh",
        "r",
        "{group: '', kind: Service, name: echo}",
        "  - backendRefs: [{name: echo-v1, port: 80}]",
    ));
    for (target, caller) in [
        ("10.1.2.3:8080", "mesh"),  // a pod IP
        ("nope.mesh:80", "mesh"),   // no such service
        ("echo.mesh:9999", "mesh"), // no such port
        ("example.com:80", "mesh"), // not a cluster name
    ] {
        let p = policy(&idx, target, caller);
        assert_eq!(p.service, None, "{target}");
        assert!(p.routes.is_empty(), "{target}");
        assert_eq!(p.source, "default");
    }
    // The ClusterIP is the service, as is the short name in its namespace.
    for (target, caller) in [("10.96.0.10:80", "consumer"), ("echo:80", "mesh")] {
        let p = policy(&idx, target, caller);
        assert_eq!(
            p.service.as_ref().map(|s| s.name.as_str()),
            Some("echo"),
            "{target}"
        );
        assert_eq!(
            render(&p),
            [format!("/* -> httproute/mesh/r/0 {V1}:80@1")],
            "{target}"
        );
    }
}

#[test]
fn mesh_split_and_matching_precedence() {
    // MeshHTTPRouteSimpleSameNamespace / MeshSplit / MeshHTTPRouteMatching.
    let split = http_route(
        "mesh",
        "mesh-split",
        "{group: '', kind: Service, name: echo}",
        "  - matches: [{path: {type: Exact, value: /v1}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n  - matches: [{path: {type: Exact, value: /v2}}]\n    backendRefs: [{name: echo-v2, port: 80}]",
    );
    let p = policy(&index(&split), "echo.mesh:80", "mesh");
    assert_eq!(
        render(&p),
        [
            format!("=/v1 -> httproute/mesh/mesh-split/0 {V1}:80@1"),
            format!("=/v2 -> httproute/mesh/mesh-split/1 {V2}:80@1"),
        ]
    );
    assert_eq!(p.source, "httproute/mesh/mesh-split");

    let matching = http_route(
        "mesh",
        "mesh-matching",
        "{group: '', kind: Service, name: echo, port: 80}",
        "  - matches: [{path: {type: PathPrefix, value: /}}, {headers: [{name: version, value: one}]}]\n    backendRefs: [{name: echo-v1, port: 8080}]\n  - matches: [{path: {type: PathPrefix, value: /v2}}, {headers: [{name: Version, value: two}]}]\n    backendRefs: [{name: echo-v2, port: 8080}]",
    );
    let p = policy(&index(&matching), "echo.mesh:80", "mesh");
    assert_eq!(
        render(&p),
        [
            format!("/v2* -> httproute/mesh/mesh-matching/1 {V2}:8080@1"),
            format!("/* h:version=one -> httproute/mesh/mesh-matching/0 {V1}:8080@1"),
            format!("/* h:version=two -> httproute/mesh/mesh-matching/1 {V2}:8080@1"),
            format!("/* -> httproute/mesh/mesh-matching/0 {V1}:8080@1"),
        ]
    );
}

#[test]
fn precedence_across_routes() {
    let a = http_route(
        "mesh",
        "a",
        "{group: '', kind: Service, name: echo}",
        "  - matches:\n    - {path: {type: PathPrefix, value: /api/}}\n    - {path: {type: RegularExpression, value: '/api/v[0-9]+'}}\n    - {path: {type: PathPrefix, value: /api}, method: GET}\n    - {path: {type: PathPrefix, value: /api}, queryParams: [{name: debug, value: '1'}]}\n    - {path: {type: PathPrefix, value: /api}, headers: [{name: x, value: a}, {name: X, value: dup}]}\n    backendRefs: [{name: echo-v1, port: 80}]",
    );
    // Same specificity as a's /api/ prefix: "a" sorts first by name.
    let b = http_route(
        "mesh",
        "b",
        "{group: '', kind: Service, name: echo}",
        "  - matches: [{path: {type: Exact, value: /api/x}}, {path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: echo-v2, port: 80}]",
    );
    let p = policy(&index(&format!("{a}---\n{b}")), "echo.mesh:80", "mesh");
    assert_eq!(
        render(&p),
        [
            format!("=/api/x -> httproute/mesh/b/0 {V2}:80@1"),
            format!("~/api/v[0-9]+ -> httproute/mesh/a/0 {V1}:80@1"),
            format!("/api* GET -> httproute/mesh/a/0 {V1}:80@1"),
            // Headers before query params; duplicate header names count once.
            format!("/api* h:x=a -> httproute/mesh/a/0 {V1}:80@1"),
            format!("/api* q:debug=1 -> httproute/mesh/a/0 {V1}:80@1"),
            format!("/api* -> httproute/mesh/a/0 {V1}:80@1"),
            format!("/api* -> httproute/mesh/b/0 {V2}:80@1"),
        ]
    );
    assert_eq!(p.source, "httproute/mesh/a,httproute/mesh/b");
}

#[test]
fn older_routes_win_ties() {
    let mk = |name: &str, created: &str, backend: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: mesh, creationTimestamp: '{created}'}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: echo}}]\n  rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]\n"
        )
    };
    let yaml = format!(
        "{}---\n{}",
        mk("a-new", "2024-02-01T00:00:00Z", "echo-v1"),
        mk("z-old", "2024-01-01T00:00:00Z", "echo-v2")
    );
    let p = policy(&index(&yaml), "echo.mesh:80", "mesh");
    assert_eq!(
        render(&p),
        [
            format!("/* -> httproute/mesh/z-old/0 {V2}:80@1"),
            format!("/* -> httproute/mesh/a-new/0 {V1}:80@1"),
        ]
    );
}

#[test]
fn parent_ports_and_section_names() {
    // MeshPorts: a route with a port applies to that port only.
    let yaml = format!(
        "{}---\n{}---\n{}",
        http_route(
            "mesh",
            "v1",
            "{group: '', kind: Service, name: echo-v1, port: 80}",
            "  - backendRefs: [{name: echo-v1, port: 80}]"
        ),
        http_route(
            "mesh",
            "v2",
            "{group: '', kind: Service, name: echo-v2}",
            "  - backendRefs: [{name: echo-v2}]"
        ),
        http_route(
            "mesh",
            "by-name",
            "{group: '', kind: Service, name: echo, sectionName: http-alt}",
            "  - backendRefs: [{name: echo-v1}]"
        ),
    );
    let idx = index(&yaml);
    assert_eq!(render(&policy(&idx, "echo-v1.mesh:80", "mesh")).len(), 1);
    assert!(render(&policy(&idx, "echo-v1.mesh:8080", "mesh")).is_empty());
    // Without a port: every port; a portless backendRef keeps the port.
    assert_eq!(
        render(&policy(&idx, "echo-v2.mesh:80", "mesh")),
        [format!("/* -> httproute/mesh/v2/0 {V2}:80@1")]
    );
    assert_eq!(
        render(&policy(&idx, "echo-v2.mesh:8080", "mesh")),
        [format!("/* -> httproute/mesh/v2/0 {V2}:8080@1")]
    );
    assert!(render(&policy(&idx, "echo.mesh:80", "mesh")).is_empty());
    assert_eq!(render(&policy(&idx, "echo.mesh:8080", "mesh")).len(), 1);
}

#[test]
fn consumer_routes_apply_to_their_namespace_only_and_replace_producer_routes() {
    let producer = http_route(
        "mesh",
        "producer",
        "{group: '', kind: Service, name: echo-v1}",
        "  - backendRefs: [{name: echo-v1, port: 80}]",
    );
    // MeshConsumerRoute: the backendRef crosses namespaces without a
    // ReferenceGrant (GEP-1294).
    let consumer = http_route(
        "consumer",
        "mesh-echo-add-header",
        "{group: '', kind: Service, name: echo-v1, namespace: mesh}",
        "  - filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: X-Header-Set, value: set}]}}]\n    backendRefs: [{name: echo-v1, namespace: mesh, port: 80}]",
    );
    let third = http_route(
        "elsewhere",
        "meddler",
        "{group: '', kind: Service, name: echo-v1, namespace: mesh}",
        "  - backendRefs: [{name: echo-v2, namespace: mesh, port: 80}]",
    );
    let idx = index(&format!("{producer}---\n{consumer}---\n{third}"));
    let from_consumer = policy(&idx, "echo-v1.mesh:80", "consumer");
    assert_eq!(
        render(&from_consumer),
        [format!(
            "/* -> httproute/consumer/mesh-echo-add-header/0 {V1}:80@1"
        )]
    );
    assert_eq!(from_consumer.routes[0].filters.len(), 1);
    for caller in ["mesh", "default"] {
        assert_eq!(
            render(&policy(&idx, "echo-v1.mesh:80", caller)),
            [format!("/* -> httproute/mesh/producer/0 {V1}:80@1")],
            "{caller}"
        );
    }
    // "elsewhere" has a consumer route of its own.
    assert_eq!(
        render(&policy(&idx, "echo-v1.mesh:80", "elsewhere")),
        [format!("/* -> httproute/elsewhere/meddler/0 {V2}:80@1")]
    );
}

#[test]
fn backends_weights_and_invalid_refs() {
    let yaml = http_route(
        "mesh",
        "w",
        "{group: '', kind: Service, name: echo, port: 80}",
        "  - backendRefs:\n    - {name: echo-v1, port: 8080, weight: 70}\n    - {name: echo-v2, port: 8080, weight: 30}\n    - {name: echo-v2, port: 80, weight: 0}\n    - {name: missing, port: 80}\n    - {name: echo-v1, port: 9999}\n    - {group: example.com, kind: Bucket, name: b}\n    - {name: other, namespace: consumer, port: 80}",
    );
    let p = policy(&index(&yaml), "echo.mesh:80", "mesh");
    let backends: Vec<String> = p.routes[0].backends.iter().map(render_backend).collect();
    assert_eq!(
        backends,
        [
            format!("{V1}:8080@70"),
            format!("{V2}:8080@30"),
            format!("{V2}:80@0"),
            "invalid(spec.rules[0].backendRefs[3]: service mesh/missing not found)@1".to_string(),
            "invalid(spec.rules[0].backendRefs[4]: service mesh/echo-v1 has no TCP port 9999)@1"
                .to_string(),
            "invalid(spec.rules[0].backendRefs[5]: backendRef \"b\" has group \"example.com\" kind \"Bucket\"; Weft routes to core Services only)@1".to_string(),
            "other.consumer.svc.cluster.local:80@1".to_string(),
        ]
    );
    // Valid backends carry their settings; invalid ones none.
    assert!(p.routes[0].backends[0].settings.is_some());
    assert!(p.routes[0].backends[3].settings.is_none());
}

#[test]
fn filters_timeouts_and_retries() {
    let yaml = http_route(
        "mesh",
        "f",
        "{group: '', kind: Service, name: echo}",
        "  - name: redirect\n    matches: [{path: {type: PathPrefix, value: /old}}]\n    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}}]\n  - name: rewrite\n    matches: [{path: {type: PathPrefix, value: /app/}}]\n    filters:\n    - {type: URLRewrite, urlRewrite: {hostname: echo-v2, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: '1'}], add: [{name: x-b, value: '2'}], remove: [x-c]}}\n    backendRefs:\n    - name: echo-v2\n      port: 80\n      filters: [{type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-from, value: v2}]}}]\n    timeouts: {request: 10s, backendRequest: 500ms}\n    retry: {codes: [500, 503], attempts: 3, backoff: 100ms}\n  - timeouts: {request: 0s}\n    retry: {}\n    backendRefs: [{name: echo-v1, port: 80}]",
    );
    let p = policy(&index(&yaml), "echo.mesh:80", "mesh");
    let redirect = &p.routes[0];
    assert_eq!(
        redirect.r#ref.as_ref().map(|r| r.rule.as_str()),
        Some("redirect")
    );
    assert!(redirect.backends.is_empty());
    let Some(pb::filter::Kind::RequestRedirect(r)) = &redirect.filters[0].kind else {
        panic!("redirect: {redirect:?}")
    };
    assert_eq!(
        (r.scheme.as_str(), r.hostname.as_str(), r.port, r.status),
        ("https", "example.com", 0, 302)
    );
    assert_eq!(
        r.path,
        Some(pb::PathModifier {
            kind: Some(pb::path_modifier::Kind::Prefix("/new".into()))
        })
    );
    let rewrite = &p.routes[1];
    assert_eq!(rewrite.filters.len(), 2);
    let Some(pb::filter::Kind::RequestHeaderModifier(h)) = &rewrite.filters[1].kind else {
        panic!("{rewrite:?}")
    };
    assert_eq!(
        (h.set.len(), h.add.len(), h.remove.clone()),
        (1, 1, vec!["x-c".to_string()])
    );
    assert_eq!(rewrite.backends[0].filters.len(), 1);
    assert_eq!(rewrite.request_timeout.map(|d| d.seconds), Some(10));
    assert_eq!(
        rewrite.backend_request_timeout.map(|d| d.nanos),
        Some(500_000_000)
    );
    let retry = rewrite.retry.clone().expect("retry");
    assert_eq!((retry.attempts, retry.codes.clone()), (3, vec![500, 503]));
    assert_eq!(retry.backoff.map(|d| d.nanos), Some(100_000_000));
    // "0s" disables the timeout: sent as zero. An empty retry stanza
    // retries once, on connection errors only.
    let third = &p.routes[2];
    assert_eq!(
        third.request_timeout,
        Some(prost_types::Duration::default())
    );
    assert_eq!(
        third.retry.as_ref().map(|r| (r.attempts, r.codes.len())),
        Some((1, 0))
    );
    // The prefix is given without its trailing slash.
    assert_eq!(render(&p)[1].split(' ').next(), Some("/app*"));
}

/// Routes that cannot be applied are left out; the others still apply, and
/// the verdict names the field and value.
#[test]
fn invalid_routes_are_left_out_with_a_reason() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "  - matches: [{path: {type: RegularExpression, value: '/a(b'}}]",
            "UnsupportedValue",
            "spec.rules[0].matches[0].path.value is \"/a(b\", not a valid regular expression",
        ),
        (
            "  - matches: [{path: {type: Glob, value: /a}}]",
            "UnsupportedValue",
            "spec.rules[0].matches[0].path.type is \"Glob\"",
        ),
        (
            "  - matches: [{path: {type: Exact, value: a}}]",
            "UnsupportedValue",
            "must start with /",
        ),
        (
            "  - matches: [{method: FETCH}]",
            "UnsupportedValue",
            "spec.rules[0].matches[0].method is \"FETCH\"",
        ),
        (
            "  - matches: [{headers: [{name: x, type: Fuzzy, value: a}]}]",
            "UnsupportedValue",
            "headers[0].type is \"Fuzzy\"",
        ),
        (
            "  - filters: [{type: CORS, cors: {allowOrigins: [\"*\"]}}]",
            "UnsupportedValue",
            "spec.rules[0].filters[0].type is CORS: Weft does not implement this filter",
        ),
        (
            "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}, percent: 5, fraction: {numerator: 1}}}]",
            "UnsupportedValue",
            "spec.rules[0].filters[0].requestMirror sets both percent and fraction",
        ),
        (
            "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}, percent: 120}}]",
            "UnsupportedValue",
            "mirrors 120/100 of the requests",
        ),
        (
            "  - backendRefs: [{name: echo-v2, port: 80, filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}}}]}]",
            "UnsupportedValue",
            "not a filter HTTPRoute supports here",
        ),
        (
            "  - filters: [{type: Teleport}]",
            "UnsupportedValue",
            "\"Teleport\"",
        ),
        (
            "  - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]",
            "UnsupportedValue",
            "statusCode is 305",
        ),
        (
            "  - filters: [{type: RequestRedirect, requestRedirect: {scheme: ftp}}]",
            "UnsupportedValue",
            "scheme is \"ftp\"",
        ),
        (
            "  - filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}]",
            "IncompatibleFilters",
            "both RequestRedirect and URLRewrite",
        ),
        (
            "  - matches: [{path: {type: Exact, value: /a}}]\n    filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]",
            "IncompatibleFilters",
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
        ),
        (
            "  - timeouts: {request: 1d}",
            "UnsupportedValue",
            "spec.rules[0].timeouts.request: \"1d\" is not a Gateway API duration",
        ),
        (
            "  - timeouts: {request: 1s, backendRequest: 2s}",
            "UnsupportedValue",
            "longer than timeouts.request",
        ),
        (
            "  - retry: {codes: [200]}",
            "UnsupportedValue",
            "spec.rules[0].retry.codes[0] is 200",
        ),
        (
            "  - backendRefs: [{name: echo-v1, port: 80, weight: -1}]",
            "UnsupportedValue",
            "weight is -1",
        ),
    ];
    let good = http_route(
        "mesh",
        "good",
        "{group: '', kind: Service, name: echo}",
        "  - backendRefs: [{name: echo-v2, port: 80}]",
    );
    for (rules, reason, message) in cases {
        let bad = http_route(
            "mesh",
            "bad",
            "{group: '', kind: Service, name: echo}",
            rules,
        );
        let idx = index(&format!("{bad}---\n{good}"));
        assert_eq!(
            render(&policy(&idx, "echo.mesh:80", "mesh")),
            [format!("/* -> httproute/mesh/good/0 {V2}:80@1")],
            "{rules}"
        );
        let state = idx.read();
        let route = state
            .http_routes
            .get(&ObjectKey::new("mesh", "bad"))
            .expect("bad route indexed");
        let v = route_verdicts(&state, route, &OutboundConfig::default());
        assert_eq!(v.len(), 1);
        assert!(!v[0].accepted.ok, "{rules}");
        assert_eq!(
            v[0].accepted.reason, *reason,
            "{rules}: {:?}",
            v[0].accepted
        );
        assert!(
            v[0].accepted.message.contains(message),
            "{rules}: {:?}",
            v[0].accepted.message
        );
    }
}

#[test]
fn route_verdicts_parents_and_refs() {
    let yaml = format!(
        "{}---\n{}",
        http_route(
            "mesh",
            "r",
            "{group: '', kind: Service, name: echo}, {group: '', kind: Service, name: ghost}, {group: '', kind: Service, name: echo-v1, port: 1234}, {name: some-gateway}",
            "  - backendRefs: [{name: echo-v1, port: 80}, {name: missing, port: 80}, {kind: Bucket, name: b}]"
        ),
        http_route(
            "mesh",
            "ok",
            "{group: '', kind: Service, name: echo, port: 80}",
            "  - backendRefs: [{name: echo-v1, port: 80}]"
        ),
    );
    let idx = index(&yaml);
    let state = idx.read();
    let cfg = OutboundConfig::default();
    let r = state
        .http_routes
        .get(&ObjectKey::new("mesh", "r"))
        .expect("r");
    let v = route_verdicts(&state, r, &cfg);
    // The Gateway parentRef is not Weft's to answer.
    let got: Vec<(&str, bool, &str)> = v
        .iter()
        .map(|p| {
            (
                p.parent_ref.name.as_str(),
                p.accepted.ok,
                p.accepted.reason.as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("echo", true, "Accepted"),
            ("ghost", false, "NoMatchingParent"),
            ("echo-v1", false, "NoMatchingParent"),
        ]
    );
    assert!(!v[0].resolved_refs.ok);
    assert_eq!(v[0].resolved_refs.reason, "BackendNotFound");
    assert!(
        v[0].resolved_refs
            .message
            .contains("service mesh/missing not found")
            && v[0].resolved_refs.message.contains("kind \"Bucket\""),
        "{:?}",
        v[0].resolved_refs
    );
    let ok = state
        .http_routes
        .get(&ObjectKey::new("mesh", "ok"))
        .expect("ok");
    let v = route_verdicts(&state, ok, &cfg);
    assert!(v[0].accepted.ok && v[0].resolved_refs.ok, "{v:?}");
    assert_eq!(v[0].resolved_refs.reason, "ResolvedRefs");
}

fn grpc_route(name: &str, annotations: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: {name}, namespace: mesh, annotations: {{{annotations}}}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: echo, port: 7070}}]\n  rules:\n{rules}\n"
    )
}

#[test]
fn grpc_routes() {
    let yaml = grpc_route(
        "g",
        "retry.weft.dev/grpc-codes: 'unavailable, DEADLINE_EXCEEDED, 8', retry.weft.dev/attempts: '2', retry.weft.dev/backoff: 25ms, timeout.weft.dev/request: 3s",
        "  - matches:\n    - method: {service: pkg.Echo, method: Say}\n    - method: {service: pkg.Echo}\n    - method: {method: Say}\n    - method: {type: RegularExpression, service: 'pkg\\..*'}\n    - headers: [{name: x-test-case, value: set}]\n    filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-header-set, value: v}]}}]\n    backendRefs:\n    - {name: echo-v1, port: 7070, weight: 70}\n    - {name: echo-v2, port: 7070, weight: 30}\n  - backendRefs: [{name: echo-v2, port: 7070}]",
    );
    let p = policy(&index(&yaml), "echo.mesh:7070", "mesh");
    let lines: Vec<String> = render(&p)
        .into_iter()
        .map(|l| l.split(" -> ").next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        lines,
        [
            "=/pkg.Echo/Say",
            // More characters of service first: "pkg.Echo" (8) before "pkg\..*" (7).
            "/pkg.Echo*",
            "~/(?:pkg\\..*)/(?:[^/]+)",
            "~/[^/]+/Say",
            "* h:x-test-case=set",
            "*",
        ]
    );
    let retry = p.routes[0].retry.clone().expect("retry from annotations");
    assert_eq!(retry.grpc_codes, [14, 4, 8]);
    assert_eq!(retry.attempts, 2);
    assert_eq!(retry.backoff.map(|d| d.nanos), Some(25_000_000));
    assert_eq!(p.routes[1].request_timeout.map(|d| d.seconds), Some(3));
    assert_eq!(
        p.routes[0].r#ref.as_ref().map(|r| r.kind.as_str()),
        Some("grpcroute")
    );

    let bad = grpc_route(
        "bad",
        "retry.weft.dev/grpc-codes: 'unavailable,teapot'",
        "  - backendRefs: [{name: echo-v1, port: 7070}]",
    );
    let idx = index(&bad);
    assert!(policy(&idx, "echo.mesh:7070", "mesh").routes.is_empty());
    let state = idx.read();
    let v = route_verdicts(
        &state,
        state
            .grpc_routes
            .get(&ObjectKey::new("mesh", "bad"))
            .expect("bad"),
        &OutboundConfig::default(),
    );
    assert_eq!(v[0].accepted.reason, "UnsupportedValue");
    assert!(
        v[0].accepted.message.contains("\"teapot\""),
        "{:?}",
        v[0].accepted
    );
}

#[test]
fn grpc_routes_win_over_http_routes() {
    let yaml = format!(
        "{}---\n{}",
        grpc_route("g", "", "  - backendRefs: [{name: echo-v1, port: 7070}]"),
        http_route(
            "mesh",
            "h",
            "{group: '', kind: Service, name: echo}",
            "  - backendRefs: [{name: echo-v2, port: 80}]"
        ),
    );
    let idx = index(&yaml);
    assert_eq!(
        policy(&idx, "echo.mesh:7070", "mesh").source,
        "grpcroute/mesh/g"
    );
    // On the other ports the HTTPRoute still applies.
    assert_eq!(
        policy(&idx, "echo.mesh:80", "mesh").source,
        "httproute/mesh/h"
    );
    let state = idx.read();
    let v = route_verdicts(
        &state,
        state
            .http_routes
            .get(&ObjectKey::new("mesh", "h"))
            .expect("h"),
        &OutboundConfig::default(),
    );
    assert_eq!(v[0].accepted.reason, "Conflicted", "{v:?}");
}

fn backend_policy(name: &str, created: &str, targets: &str, extra: &str) -> String {
    format!(
        "apiVersion: policy.weft.dev/v1alpha1\nkind: BackendPolicy\nmetadata: {{name: {name}, namespace: mesh, creationTimestamp: '{created}'}}\nspec:\n  targetRefs: [{targets}]\n{extra}\n"
    )
}

#[test]
fn backend_policies_give_settings() {
    let yaml = format!(
        "{}---\n{}---\n{}---\n{}---\n{}",
        backend_policy(
            "whole",
            "2024-01-01T00:00:00Z",
            "{group: '', kind: Service, name: echo}",
            "  retryBudget: {retryRatio: 0.5}\n  timeouts: {request: 5s}"
        ),
        backend_policy(
            "newer",
            "2024-02-01T00:00:00Z",
            "{group: '', kind: Service, name: echo}",
            "  retryBudget: {retryRatio: 0.9}"
        ),
        backend_policy(
            "alt-port",
            "2024-03-01T00:00:00Z",
            "{group: '', kind: Service, name: echo, sectionName: http-alt}",
            "  circuitBreaker: {consecutiveFailures: 2}"
        ),
        backend_policy(
            "broken",
            "2023-01-01T00:00:00Z",
            "{group: '', kind: Service, name: echo-v1}, {group: '', kind: Service, name: ghost}",
            "  timeouts: {connect: soon}"
        ),
        http_route(
            "mesh",
            "r",
            "{group: '', kind: Service, name: echo}",
            "  - backendRefs: [{name: echo, port: 8080}, {name: echo-v1, port: 80}]"
        ),
    );
    let idx = index(&yaml);
    let p80 = policy(&idx, "echo.mesh:80", "mesh");
    let s = p80.settings.clone().expect("settings");
    assert_eq!(s.source, "backendpolicy/mesh/whole");
    assert_eq!(s.budget.map(|b| b.retry_ratio), Some(0.5));
    assert_eq!(s.request_timeout.map(|d| d.seconds), Some(5));
    let b = &p80.routes[0].backends;
    let src = |i: usize| b[i].settings.as_ref().map(|s| s.source.clone());
    // A port-specific policy beats the whole-service one.
    assert_eq!(src(0), Some("backendpolicy/mesh/alt-port".into()));
    assert_eq!(
        b[0].settings
            .as_ref()
            .and_then(|s| s.breaker.as_ref())
            .map(|c| c.consecutive_failures),
        Some(2)
    );
    // An invalid policy is not applied: defaults.
    assert_eq!(src(1), Some("default".into()));

    let state = idx.read();
    let verdicts = |name: &str| -> Vec<(String, String)> {
        let p = state
            .policies
            .get(&ObjectKey::new("mesh", name))
            .expect(name);
        policy_verdicts(&state, p)
            .into_iter()
            .map(|(a, v)| (a.name, v.reason))
            .collect()
    };
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(verdicts("whole"), [pair("echo", "Accepted")]);
    assert_eq!(verdicts("newer"), [pair("echo", "Conflicted")]);
    assert_eq!(verdicts("alt-port"), [pair("echo", "Accepted")]);
    assert_eq!(
        verdicts("broken"),
        [pair("echo-v1", "Invalid"), pair("ghost", "Invalid")]
    );
}

#[test]
fn grpc_code_names() {
    for (name, code) in [
        ("ok", Some(0)),
        ("cancelled", Some(1)),
        ("CANCELED", Some(1)),
        ("deadline-exceeded", Some(4)),
        ("DEADLINE_EXCEEDED", Some(4)),
        ("resource_exhausted", Some(8)),
        ("unavailable", Some(14)),
        ("16", Some(16)),
        ("17", None),
        ("teapot", None),
    ] {
        assert_eq!(grpc_code(name), code, "{name}");
    }
}

#[test]
fn request_mirrors_resolve_their_service_like_a_backend() {
    let yaml = http_route(
        "mesh",
        "m",
        "{group: '', kind: Service, name: echo}",
        "  - matches: [{headers: [{name: x-mirror, value: 'true'}]}]\n    filters:\n    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: '1'}]}}\n    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}, percent: 25}}\n    - {type: RequestMirror, requestMirror: {backendRef: {name: nowhere, port: 80}, fraction: {numerator: 1, denominator: 3}}}\n    backendRefs: [{name: echo-v1, port: 80}]",
    );
    let p = policy(&index(&yaml), "echo.mesh:80", "mesh");
    let filters = &p.routes[0].filters;
    assert_eq!(filters.len(), 3, "{filters:?}");
    let mirror = |i: usize| match &filters[i].kind {
        Some(pb::filter::Kind::RequestMirror(m)) => m.clone(),
        other => panic!("filter {i}: {other:?}"),
    };
    let m = mirror(1);
    assert_eq!((m.numerator, m.denominator), (25, 100));
    let b = m.backend.expect("backend");
    assert_eq!(
        b.kind,
        Some(pb::backend::Kind::Target(
            "echo-v2.mesh.svc.cluster.local:80".into()
        ))
    );
    assert!(b.settings.is_some(), "the mirror's service settings");
    // A Service that does not exist mirrors nothing; the route still applies.
    let m = mirror(2);
    assert_eq!((m.numerator, m.denominator), (1, 3));
    assert!(
        matches!(
            m.backend.and_then(|b| b.kind),
            Some(pb::backend::Kind::Invalid(why)) if why.contains("nowhere")
        ),
        "an unknown mirror service is sent as invalid"
    );
    // ... and reported in the route's ResolvedRefs.
    let idx = index(&yaml);
    let state = idx.read();
    let v = route_verdicts(
        &state,
        state
            .http_routes
            .get(&ObjectKey::new("mesh", "m"))
            .expect("route"),
        &OutboundConfig::default(),
    );
    let text = format!("{v:?}");
    assert!(
        text.contains("BackendNotFound") && text.contains("nowhere"),
        "{text}"
    );

    // GRPCRoute rules mirror too (the mesh conformance suite's MeshGRPCRouteRequestMirror).
    let yaml = grpc_route(
        "gm",
        "",
        "  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 7070}}}]\n    backendRefs: [{name: echo-v1, port: 7070}]",
    );
    let p = policy(&index(&yaml), "echo.mesh:7070", "mesh");
    let Some(pb::filter::Kind::RequestMirror(m)) = &p.routes[0].filters[0].kind else {
        panic!("{:?}", p.routes[0].filters)
    };
    assert_eq!((m.numerator, m.denominator), (1, 1));
    assert_eq!(
        m.backend.as_ref().and_then(|b| b.kind.clone()),
        Some(pb::backend::Kind::Target(
            "echo-v2.mesh.svc.cluster.local:7070".into()
        ))
    );
}

/// A route as one manifest document with a generation.
fn route_object(yaml: &str) -> crate::model::Object {
    let mut loaded = load_manifests(Path::new("edit.yaml"), yaml).expect("route parses");
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    assert_eq!(loaded.objects.len(), 1);
    loaded.objects.remove(0)
}

fn verdict_of(idx: &Index, kind: Kind, name: &str) -> Verdict {
    let state = idx.read();
    let route = state
        .route(kind, &ObjectKey::new("mesh", name))
        .expect("route indexed");
    let v = route_verdicts(&state, route, &OutboundConfig::default());
    assert_eq!(v.len(), 1, "{v:?}");
    v[0].accepted.clone()
}

/// "An invalid route never breaks the proxy": an edit that makes a live
/// route invalid leaves its last accepted version in force while its status
/// says the new generation is not accepted; a valid edit is followed; a
/// route that was never valid stays out; deleting removes it.
#[test]
fn an_invalid_edit_keeps_the_last_accepted_version_in_force() {
    let edit = |generation: u32, rules: &str| {
        route_object(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: mesh, generation: {generation}}}\nspec:\n  parentRefs: [{{group: '', kind: Service, name: echo}}]\n  rules:\n{rules}\n"
        ))
    };
    let idx = index("");
    idx.apply([Change::Upsert(edit(
        1,
        "  - matches: [{path: {type: PathPrefix, value: /a}}]\n    backendRefs: [{name: echo-v1, port: 80}]",
    ))]);
    let accepted = policy(&idx, "echo.mesh:80", "mesh");
    assert_eq!(
        render(&accepted),
        [format!("/a* -> httproute/mesh/r/0 {V1}:80@1")]
    );
    assert!(verdict_of(&idx, Kind::HttpRoute, "r").ok);

    // Generation 2 has a bad regex: generation 1 stays in force, and is
    // what a proxy gets (the same policy, so the stream sends nothing).
    let bad_regex = "  - matches: [{path: {type: RegularExpression, value: '/a(b'}}]\n    backendRefs: [{name: echo-v2, port: 80}]";
    let applied = idx.apply([Change::Upsert(edit(2, bad_regex))]);
    assert_eq!(
        applied.changed, 1,
        "the new generation is indexed for status"
    );
    assert_eq!(applied.topics, 0, "what proxies get did not change");
    assert_eq!(policy(&idx, "echo.mesh:80", "mesh"), accepted);
    let v = verdict_of(&idx, Kind::HttpRoute, "r");
    assert!(!v.ok, "{v:?}");
    assert_eq!(v.reason, "UnsupportedValue");
    assert!(
        v.message.contains("not a valid regular expression")
            && v.message
                .contains("the last accepted version (generation 1) stays in force"),
        "{v:?}"
    );
    // Another invalid edit (an unsupported filter) still keeps generation 1.
    idx.apply([Change::Upsert(edit(
        3,
        "  - filters: [{type: CORS, cors: {}}]\n    backendRefs: [{name: echo-v2, port: 80}]",
    ))]);
    assert_eq!(policy(&idx, "echo.mesh:80", "mesh"), accepted);
    let v = verdict_of(&idx, Kind::HttpRoute, "r");
    assert!(
        v.message.contains("CORS") && v.message.contains("(generation 1) stays in force"),
        "{v:?}"
    );

    // A valid edit is followed, and nothing is held any more.
    idx.apply([Change::Upsert(edit(
        4,
        "  - matches: [{path: {type: Exact, value: /b}}]\n    backendRefs: [{name: echo-v2, port: 80}]",
    ))]);
    assert_eq!(
        render(&policy(&idx, "echo.mesh:80", "mesh")),
        [format!("=/b -> httproute/mesh/r/0 {V2}:80@1")]
    );
    assert!(idx.read().held_routes.is_empty());
    let v = verdict_of(&idx, Kind::HttpRoute, "r");
    assert!(v.ok, "{v:?}");

    // Broken again, then deleted: the held version goes with the route.
    idx.apply([Change::Upsert(edit(5, bad_regex))]);
    assert_eq!(policy(&idx, "echo.mesh:80", "mesh").routes.len(), 1);
    idx.apply([Change::Delete(Kind::HttpRoute, ObjectKey::new("mesh", "r"))]);
    let p = policy(&idx, "echo.mesh:80", "mesh");
    assert!(p.routes.is_empty() && p.source == "default", "{p:?}");
    assert!(idx.read().held_routes.is_empty());

    // A route that was never valid stays out, and its status does not
    // claim an earlier version.
    idx.apply([Change::Upsert(edit(1, bad_regex))]);
    assert!(policy(&idx, "echo.mesh:80", "mesh").routes.is_empty());
    let v = verdict_of(&idx, Kind::HttpRoute, "r");
    assert!(!v.ok && !v.message.contains("stays in force"), "{v:?}");
}

/// The same for a GRPCRoute (a bad annotation), including an invalid edit
/// that also moves the route to another parent: the accepted version, with
/// its own parent, is what applies.
#[test]
fn an_invalid_grpc_route_edit_keeps_the_last_accepted_version_in_force() {
    let good = route_object(&grpc_route(
        "g",
        "retry.weft.dev/attempts: '2'",
        "  - backendRefs: [{name: echo-v1, port: 7070}]",
    ));
    let idx = index("");
    idx.apply([Change::Upsert(good)]);
    let accepted = policy(&idx, "echo.mesh:7070", "mesh");
    assert_eq!(accepted.source, "grpcroute/mesh/g");
    let bad = grpc_route(
        "g",
        "retry.weft.dev/attempts: 'many'",
        "  - backendRefs: [{name: echo-v2, port: 7070}]",
    )
    .replace("name: echo, port: 7070", "name: echo-v1, port: 7070");
    idx.apply([Change::Upsert(route_object(&bad))]);
    assert_eq!(policy(&idx, "echo.mesh:7070", "mesh"), accepted);
    assert_eq!(policy(&idx, "echo-v1.mesh:7070", "mesh").source, "default");
    let state = idx.read();
    let latest = state
        .grpc_routes
        .get(&ObjectKey::new("mesh", "g"))
        .expect("g");
    let v = route_verdicts(&state, latest, &OutboundConfig::default());
    assert_eq!(v[0].parent_ref.name, "echo-v1", "status is the latest's");
    assert!(
        !v[0].accepted.ok
            && v[0].accepted.message.contains("\"many\"")
            && v[0]
                .accepted
                .message
                .contains("the last accepted version stays in force"),
        "{v:?}"
    );
}

/// RequestRedirect: every status code the spec allows, and the port
/// (mesh conformance MeshHTTPRouteRedirectPort / ...RedirectHostAndStatus).
#[test]
fn request_redirect_status_codes_and_port() {
    for (code, want) in [
        ("", 302),
        ("301", 301),
        ("302", 302),
        ("303", 303),
        ("307", 307),
        ("308", 308),
    ] {
        let status = if code.is_empty() {
            String::new()
        } else {
            format!(", statusCode: {code}")
        };
        let yaml = http_route(
            "mesh",
            "redirect",
            "{group: '', kind: Service, name: echo}",
            &format!(
                "  - filters: [{{type: RequestRedirect, requestRedirect: {{hostname: example.org, port: 8443{status}}}}}]"
            ),
        );
        let p = policy(&index(&yaml), "echo.mesh:80", "mesh");
        assert_eq!(p.routes.len(), 1, "statusCode {code:?}");
        let Some(pb::filter::Kind::RequestRedirect(r)) = &p.routes[0].filters[0].kind else {
            panic!("{:?}", p.routes[0].filters)
        };
        assert_eq!(
            (r.status, r.port, r.hostname.as_str(), r.scheme.as_str()),
            (want, 8443, "example.org", ""),
            "statusCode {code:?}"
        );
        assert!(r.path.is_none());
    }
    for (port, why) in [("0", "port is 0"), ("70000", "port is 70000")] {
        let yaml = http_route(
            "mesh",
            "redirect",
            "{group: '', kind: Service, name: echo}",
            &format!("  - filters: [{{type: RequestRedirect, requestRedirect: {{port: {port}}}}}]"),
        );
        let idx = index(&yaml);
        assert!(policy(&idx, "echo.mesh:80", "mesh").routes.is_empty());
        let v = verdict_of(&idx, Kind::HttpRoute, "redirect");
        assert!(
            !v.ok && v.message.contains(why) && v.message.contains("expected 1-65535"),
            "{v:?}"
        );
    }
}

/// GRPCRoute weights and RequestHeaderModifier (mesh conformance
/// MeshGRPCRouteWeight, MeshGRPCRouteRequestHeaderModifier): on the rule and
/// on a backendRef.
#[test]
fn grpc_route_weights_and_header_modifiers() {
    let yaml = grpc_route(
        "w",
        "",
        "  - matches: [{method: {service: pkg.Echo}}]\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set: [{name: X-Header-Set, value: set-overwrites-values}]\n        add: [{name: x-header-add, value: header-val-1}]\n        remove: [x-header-remove]\n    backendRefs:\n    - {name: echo-v1, port: 7070, weight: 70}\n    - name: echo-v2\n      port: 7070\n      weight: 30\n      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-backend, value: v2}]}}]\n    - {name: echo, port: 7070, weight: 0}",
    );
    let p = policy(&index(&yaml), "echo.mesh:7070", "mesh");
    assert_eq!(
        render(&p),
        [format!(
            "/pkg.Echo* -> grpcroute/mesh/w/0 {V1}:7070@70,{V2}:7070@30,echo.mesh.svc.cluster.local:7070@0"
        )]
    );
    let route = &p.routes[0];
    assert_eq!(
        route.filters,
        [pb::Filter {
            kind: Some(pb::filter::Kind::RequestHeaderModifier(
                pb::HeaderModifier {
                    set: vec![pb::Header {
                        name: "X-Header-Set".into(),
                        value: "set-overwrites-values".into()
                    }],
                    add: vec![pb::Header {
                        name: "x-header-add".into(),
                        value: "header-val-1".into()
                    }],
                    remove: vec!["x-header-remove".into()],
                }
            ))
        }]
    );
    assert!(route.backends[0].filters.is_empty());
    assert_eq!(
        route.backends[1].filters,
        [pb::Filter {
            kind: Some(pb::filter::Kind::RequestHeaderModifier(
                pb::HeaderModifier {
                    set: vec![],
                    add: vec![pb::Header {
                        name: "x-backend".into(),
                        value: "v2".into()
                    }],
                    remove: vec![],
                }
            ))
        }]
    );
    // A GRPCRoute has no redirects or rewrites, on the rule or a backend.
    for filters in [
        "    filters: [{type: RequestRedirect, requestRedirect: {hostname: x}}]\n    backendRefs: [{name: echo-v1, port: 7070}]",
        "    backendRefs: [{name: echo-v1, port: 7070, filters: [{type: URLRewrite, urlRewrite: {hostname: x}}]}]",
    ] {
        let idx = index(&grpc_route("bad", "", &format!("  - matches: [{{method: {{service: pkg.Echo}}}}]\n{filters}")));
        assert!(policy(&idx, "echo.mesh:7070", "mesh").routes.is_empty(), "{filters}");
        let v = verdict_of(&idx, Kind::GrpcRoute, "bad");
        assert!(
            !v.ok && v.message.contains("not a filter GRPCRoute supports here"),
            "{v:?}"
        );
    }
}
